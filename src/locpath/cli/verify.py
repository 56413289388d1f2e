"""`locpath verify BUNDLE`: a bundle's checksums (and signature) checked without running it."""

from __future__ import annotations

import json

TRUST_HELP = ("require a signature by one of these Ed25519 public keys (default: $LOCPATH_TRUSTED_KEYS; unset = "
              "checksums only)")


def register(sub) -> None:
    v = sub.add_parser("verify", help="check a bundle's checksums (and signature) without running it")
    v.add_argument("bundle", help="a bundle folder")
    v.add_argument("--trusted-keys", default=None, metavar="PEM_OR_DIR", help=TRUST_HELP)
    v.add_argument("--json", action="store_true", help="print the result as one JSON object")
    v.set_defaults(func=run)


def run(args) -> int:
    from ..bundle.integrity import TrustedKeys, is_signed, verify_bundle

    keys = TrustedKeys.from_setting(args.trusted_keys)
    m = verify_bundle(args.bundle, trusted_keys=keys)
    info = {"bundle": str(args.bundle), "ok": True, "files": len(m.files) + 1, "signed": is_signed(args.bundle),
            "signature_checked": keys is not None, "components": sorted(m.components)}
    print(json.dumps(info) if args.json else
          f"{args.bundle}: OK ({info['files']} files checked{', signature verified' if keys else ''}"
          f"{'' if keys or not info['signed'] else '; signed, signature not checked without --trusted-keys'})")
    return 0
