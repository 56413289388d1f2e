"""`locpath sign BUNDLE --key PEM`: a bundle's SHA256SUMS signed with an Ed25519 private key."""

from __future__ import annotations


def register(sub) -> None:
    sg = sub.add_parser("sign", help="sign a bundle's SHA256SUMS with an Ed25519 private key")
    sg.add_argument("bundle", help="a bundle folder")
    sg.add_argument("--key", required=True, help="PEM private key (from `locpath keygen` or openssl genpkey -algorithm "
                                                 "ed25519); an encrypted key reads its password from $LOCPATH_KEY_PASSWORD")
    sg.set_defaults(func=run)


def run(args) -> int:
    from ..bundle.integrity import sign_bundle

    kid = sign_bundle(args.bundle, args.key)
    print(f"{args.bundle}: signed with Ed25519 key {kid} (SHA256SUMS.sig)")
    return 0
