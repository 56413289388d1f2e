"""`locpath encoders`: the registered tile encoders, what `import --encoder` and feature files may name."""

from __future__ import annotations

import json


def register(sub) -> None:
    en = sub.add_parser("encoders", help="the registered tile encoders (TRIDENT's names, widths, tile geometry)")
    en.add_argument("--json", action="store_true", help="print them as a JSON list")
    en.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import asdict

    from ..encoders import ENCODERS

    if args.json:
        print(json.dumps([{k: v for k, v in asdict(e).items() if k not in ("timm_kwargs", "unused_keys")}
                          | {"timm_kwargs": e.timm_kwargs} for e in ENCODERS.values()], indent=1))
        return 0
    print(f"{'name':<10} {'width':>5} {'tile':>4} {'um/px':>5}  {'timm model':<30} aliases")
    for e in ENCODERS.values():
        print(f"{e.name:<10} {e.out_dim:>5} {e.img_size:>4} {e.target_mpp:>5}  {e.timm_model:<30} {', '.join(e.aliases)}")
    return 0
