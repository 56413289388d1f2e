"""`locpath synth OUT`: synthetic pyramidal slides with their ground truth."""

from __future__ import annotations

from pathlib import Path

from .common import jpeg_quality, positive_float, positive_int


def register(sub) -> None:
    s = sub.add_parser("synth", help="write synthetic pyramidal slides with ground truth")
    s.add_argument("out", help="folder to write the slides into")
    s.add_argument("--count", type=positive_int, default=1, help="slides to write (default 1)")
    s.add_argument("--seed", type=int, default=0, help="seed of the first slide; the next ones count up (default 0)")
    s.add_argument("--held-out", action="store_true", help="use the evaluation seed space (as `locpath eval`)")
    s.add_argument("--format", choices=("svs", "tiff"), default="svs", help="file format (default svs)")
    s.add_argument("--mpp", type=positive_float, default=0.5, help="level-0 microns per pixel (default 0.5)")
    s.add_argument("--tiles", type=positive_int, nargs=2, metavar=("COLS", "ROWS"), default=None,
                   help="slide size in 224 px tiles at 0.5 um/px")
    s.add_argument("--organ", choices=("colon", "lung", "breast", "kidney"), help="fix the organ (default: drawn)")
    s.add_argument("--diagnosis", choices=("benign", "adenocarcinoma", "squamous cell carcinoma"),
                   help="fix the diagnosis (default: drawn)")
    s.add_argument("--grade", choices=("low grade", "high grade"), help="fix the grade (default: drawn)")
    s.add_argument("--necrosis", choices=("yes", "no"), help="fix whether necrosis is present (default: drawn)")
    s.add_argument("--quality", type=jpeg_quality, default=85, help="JPEG quality of the tiles (1-100)")
    s.set_defaults(func=run)


def run(args) -> int:
    from ..synth import make_spec, write_slide
    from ..synth.seeds import split_seed

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        seed = split_seed(args.seed, "eval", i) if args.held_out else args.seed + i
        tiles = (args.tiles[0], args.tiles[1]) if args.tiles else None
        spec = make_spec(seed, tiles=tiles, mpp=args.mpp, organ=args.organ, diagnosis=args.diagnosis,
                         grade=args.grade, necrosis=None if args.necrosis is None else args.necrosis == "yes")
        path = write_slide(spec, out / f"synthetic_{seed}.{args.format}", fmt=args.format, quality=args.quality)
        gt = spec.ground_truth()
        print(f"{path}: {gt['organ']}, {gt['diagnosis']}, {gt['grade']}, necrosis {gt['necrosis']} "
              f"({gt['dimensions'][0]}x{gt['dimensions'][1]} px, {gt['tissue_tiles']} tissue tiles, "
              f"diagnostic {gt['diagnostic_fraction']:.1%})")
    return 0
