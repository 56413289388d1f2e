"""`locpath train`: the reference model and the prefix baseline (needs the training extra)."""

from __future__ import annotations


def register(sub) -> None:
    tr = sub.add_parser("train", help="train the reference model and the prefix baseline")
    tr.add_argument("--preset", default="tiny", choices=("tiny",), help="model and schedule size (default tiny)")
    tr.add_argument("--out", default="runs/tiny", help="run folder (default runs/tiny)")
    tr.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    tr.add_argument("--quick", action="store_true", help="a seconds-long smoke run (not a useful model)")
    tr.set_defaults(func=run)


def run(args) -> int:
    from ..train.run import run_training

    run_training(args)
    return 0
