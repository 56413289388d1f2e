"""`locpath trust fit BUNDLE`: fit the bundle's trust numbers (confidence temperature and threshold, OOD statistics and
threshold, minimum tissue tiles) on synthetic training and validation slides through the torch-free runtime, and
write them into the bundle as trust.json (checksummed with the bundle; a signature must be renewed)."""

from __future__ import annotations

import json

from ..runtime.options import RuntimeOptions, add_runtime_options, int_at_least, runtime_options
from .common import non_negative_int

DEFAULTS = RuntimeOptions(use_cache=False)


def register(sub) -> None:
    t = sub.add_parser("trust", help="fit a bundle's confidence calibration and out-of-distribution detector")
    tsub = t.add_subparsers(dest="trust_command", required=True, metavar="fit",
                            help="fit: write trust.json into the bundle")
    f = tsub.add_parser("fit", help="write trust.json into a bundle from synthetic training and validation slides")
    f.add_argument("bundle", help="a bundle folder (rewritten in place: trust.json, manifest.json, SHA256SUMS)")
    f.add_argument("--train-seed", type=non_negative_int, default=0,
                   help="seed of the training slides (split 'train'): the OOD statistics and the minimum tissue; use "
                        "the seed the model was trained with (the reference model: 0, see its train.json)")
    f.add_argument("--val-seed", type=non_negative_int, default=2,
                   help="seed of the validation slides (split 'eval'): temperature and thresholds; keep it apart "
                        "from the training run's validation seed and from the seeds you measure on (default 2)")
    f.add_argument("--train-slides", type=int_at_least(2), default=100, help="training slides (default 100)")
    f.add_argument("--val-slides", type=int_at_least(2), default=150, help="validation slides (default 150)")
    f.add_argument("--json", action="store_true", help="print the fitted numbers as one JSON object")
    add_runtime_options(f, DEFAULTS)
    f.set_defaults(func=run)


def run(args) -> int:
    from ..trust.fit import fit_bundle

    model, was_signed = fit_bundle(args.bundle, args.train_seed, args.val_seed, args.train_slides, args.val_slides,
                                   options=runtime_options(args, DEFAULTS), progress=not args.json)
    summary = {"bundle": str(args.bundle), "temperature": model.temperature,
               "confidence_threshold": model.confidence_threshold, "ood_threshold": model.ood.threshold,
               "min_tissue_tiles": model.min_tissue_tiles, "signature_removed": was_signed, "fit": model.fit}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{args.bundle}: trust.json written (temperature {model.temperature:.3f}, confidence threshold "
          f"{model.confidence_threshold:.4f}, OOD threshold {model.ood.threshold:.4f}, minimum tissue tiles "
          f"{model.min_tissue_tiles}); validation accuracy {model.fit['val_accuracy']:.3f}, ECE {model.fit['val_ece']:.4f}")
    if was_signed:
        print(f"{args.bundle}: its signature no longer holds (SHA256SUMS changed) and was removed: sign it again "
              "with `locpath sign`")
    return 0
