"""`locpath inspect CHECKPOINT`: what a checkpoint holds, read without loading it."""

from __future__ import annotations

import json

from .common import positive_int


def register(sub) -> None:
    ins = sub.add_parser("inspect", help="key inventory of a checkpoint: .pth/.bin (weights only), .safetensors, a "
                                         "Hugging Face model folder (sharded) or a PEFT adapter folder")
    ins.add_argument("checkpoint", help="a checkpoint file or folder")
    ins.add_argument("--depth", type=positive_int, default=None,
                     help="group keys by their first N name components (default: all, numeric indices as *)")
    ins.add_argument("--json", action="store_true", help="print the inventory as JSON (locpath-inventory/1)")
    ins.set_defaults(func=run)


def run(args) -> int:
    from ..export.inventory import format_inventory, inventory, open_source

    src = open_source(args.checkpoint)
    inv = inventory(src, depth=args.depth)
    src.close()
    print(json.dumps(inv, indent=2) if args.json else format_inventory(inv))
    return 0
