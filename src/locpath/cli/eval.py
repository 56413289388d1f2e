"""`locpath eval`: accuracy on held-out synthetic slides, through PyTorch (a checkpoint) or the runtime (a bundle)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LocpathError
from ..runtime.options import RuntimeOptions, add_runtime_options, runtime_options
from .common import non_negative_int, positive_int, retell

DEFAULTS = RuntimeOptions()


def register(sub) -> None:
    e = sub.add_parser("eval", help="accuracy on held-out synthetic slides")
    e.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped reference)")
    e.add_argument("--bundle", default=None, help="evaluate an exported bundle through the torch-free runtime "
                                                  "(the runtime flags below apply to it)")
    e.add_argument("--seed", type=int, default=1, help="held-out seed (default 1)")
    e.add_argument("--count", type=positive_int, default=20, help="held-out slides (default 20)")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    e.add_argument("--records", action="store_true", help="with --json: every question, answer and truth")
    e.add_argument("--keep-slides", default=None, help="keep the generated slides in this folder")
    e.add_argument("--trust", action="store_true",
                   help="with --bundle: how far its trust.json holds: expected calibration error, accuracy against "
                        "coverage, and the OOD detector's AUROC and false flags (held-out slides against the OOD set)")
    e.add_argument("--ood-count", type=non_negative_int, default=8,
                   help="with --trust: OOD slides per synthetic kind (stain, blur, pen, nontissue; default 8)")
    e.add_argument("--real-slide", action="append", default=[], metavar="SLIDE",
                   help="with --trust: a real H&E slide for the OOD set (whole, rotated, mirrored, halved); repeatable")
    add_runtime_options(e, DEFAULTS)
    retell(e, "--cache-dir", "cache the held-out slides' latents in this folder (default: no slide cache)")
    e.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoints import shipped_checkpoint

    if args.bundle and args.checkpoint:
        raise LocpathError("give either --checkpoint or --bundle, not both")
    if args.trust:
        return _trust(args)
    if args.bundle:
        from ..eval import evaluate_bundle

        ckpt = Path(args.bundle)
        # held-out slides are written fresh: a slide cache only where one is named
        options = runtime_options(args, DEFAULTS).replace(use_cache=args.use_cache and args.cache_dir is not None)
        res = evaluate_bundle(ckpt, args.seed, args.count, keep_dir=args.keep_slides, progress=not args.json,
                              options=options)
    else:
        from ..eval import evaluate_checkpoint

        ckpt = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint("reference")
        res = evaluate_checkpoint(ckpt, args.seed, args.count, keep_dir=args.keep_slides, progress=not args.json)
    if args.json:
        print(json.dumps(res.to_dict(with_records=args.records)))
    else:
        print(f"checkpoint {ckpt}: {res.count} held-out slides (seed {res.seed}), {res.seconds:.0f} s")
        print(f"accuracy {res.accuracy:.3f}")
        for t, a in res.per_type.items():
            print(f"  {t:10s} {a:.3f}")
    return 0


def _trust(args) -> int:
    from ..trust.report import evaluate_trust

    if not args.bundle:
        raise LocpathError("--trust measures a bundle's trust.json: give --bundle")
    for p in args.real_slide:
        if not Path(p).is_file():
            raise LocpathError(f"{p}: --real-slide: no such file")
    rep = evaluate_trust(Path(args.bundle), args.seed, args.count, args.ood_count, args.real_slide,
                         options=runtime_options(args, DEFAULTS), progress=not args.json, with_records=args.records)
    if args.json:
        print(json.dumps(rep))
        return 0
    cal, ood = rep["calibration"], rep["ood"]
    print(f"bundle {rep['bundle']}: {rep['count']} held-out slides (seed {rep['seed']}), {cal['answers']} answers, "
          f"{rep['seconds']:.0f} s")
    print(f"accuracy {cal['accuracy']:.4f}, mean confidence {cal['mean_confidence']:.4f}, "
          f"expected calibration error {cal['ece']:.4f} (temperature {rep['temperature']:.3f})")
    print("  threshold  coverage  accuracy  answered")
    for r in cal["coverage_table"]:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        print(f"  {r['threshold']:9.4f}  {r['coverage']:8.4f}  {acc:>8}  {r['answered']:8d}")
    print(f"OOD: AUROC {ood['auroc']}, threshold {ood['threshold']:.4f}: {ood['false_flag_rate']:.1%} of "
          f"{ood['in_distribution_slides']} held-out slides flagged, {ood['ood_flagged'] or 0:.1%} of "
          f"{ood['ood_slides']} OOD slides")
    for k, v in ood["per_kind"].items():
        print(f"  {k:10s} {v['slides']:3d} slides, flagged {v['flagged']:.1%}, AUROC {v['auroc']}")
    return 0
