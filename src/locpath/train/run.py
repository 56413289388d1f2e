"""`locpath train`: run every stage, save both checkpoints with the command that reproduces them."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from ..models.checkpoint import save_checkpoint
from .stages import Log, TrainConfig, train_all


def quick_config(seed: int) -> TrainConfig:
    return TrainConfig(seed=seed, encoder_slides=6, encoder_epochs=1, train_slides=8, val_slides=2, batch_slides=4,
                       llm_steps=4, mae_steps=4, align_steps=4, instruct_steps=4,
                       prefix_align_steps=4, prefix_instruct_steps=4, slide_tiles=(8, 8))


def run_training(args) -> dict:
    tc = quick_config(args.seed) if args.quick else TrainConfig(preset=args.preset, seed=args.seed)
    out = Path(args.out)
    log = Log()
    log(f"training preset {tc.preset} (seed {tc.seed}) into {out}")
    res = train_all(tc, log)
    import torch

    command = "locpath train --preset {} --seed {} --out {}{}".format(tc.preset, tc.seed, out, " --quick" if args.quick else "")
    info = dict(res["info"], command=command, torch=torch.__version__, python=platform.python_version(),
                argv=sys.argv[1:])
    for name in ("reference", "prefix"):
        model, tok = res[name]
        save_checkpoint(model, tok, out / name, train_info=dict(info, model=name))
        log(f"saved {out / name}")
    print(json.dumps(res["info"]["validation"]))
    return res
