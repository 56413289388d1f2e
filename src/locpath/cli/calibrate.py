"""`locpath calibrate BUNDLE --slides ...`: calibration data for quantization, drawn from slides' tissue tiles."""

from __future__ import annotations

import json

from .common import positive_int, quiet_if


def register(sub) -> None:
    cb = sub.add_parser("calibrate", help="calibration data for quantization, from slides' tissue tiles")
    cb.add_argument("bundle", help="the fp32 bundle whose stages the calibration tiles go through")
    cb.add_argument("--slides", nargs="+", required=True, help="slides to draw tissue tiles from")
    cb.add_argument("--tiles-per-slide", type=positive_int, default=48, help="tiles drawn per slide (default 48)")
    cb.add_argument("--seed", type=int, default=0, help="seed of the tile draw (default 0)")
    cb.add_argument("--out", default=None, help="npz path (default: BUNDLE/calibration/<key>.npz)")
    cb.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    cb.set_defaults(func=run)


def run(args) -> int:
    from ..calibration.sets import build_calibration

    cal = build_calibration(args.bundle, args.slides, tiles_per_slide=args.tiles_per_slide, seed=args.seed,
                            out=args.out, log=quiet_if(args.json))
    summary = {"calibration": str(cal.path), "cached": cal.cached, "tiles": int(len(cal.tiles())),
               "arrays": len(cal.arrays)}
    print(json.dumps(summary) if args.json else f"calibration: {cal.path} ({summary['tiles']} tiles, "
          f"{'cached' if cal.cached else 'new'})")
    return 0
