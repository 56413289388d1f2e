"""`locpath tiles SLIDE`: tissue statistics and the tile grid of a slide (and, with --read, the reader's speed)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import positive_float, positive_int


def register(sub) -> None:
    t = sub.add_parser("tiles", help="tissue statistics and tile grid of a slide")
    t.add_argument("slide", help="a slide file or a DICOM series folder")
    t.add_argument("--mpp-override", type=positive_float, default=None, help="level-0 microns per pixel")
    t.add_argument("--target-mpp", type=positive_float, default=0.5, help="microns per pixel of the tiles (default 0.5)")
    t.add_argument("--tile-size", type=positive_int, default=224, help="tile side in pixels (default 224)")
    t.add_argument("--min-tissue", type=float, default=0.25,
                   help="the tissue fraction a tile needs to be kept (default 0.25)")
    t.add_argument("--mask-mpp", type=positive_float, default=8.0,
                   help="microns per pixel of the tissue mask (default 8)")
    t.add_argument("--backend", choices=("auto", "openslide", "tiffslide"), default="auto",
                   help="slide library (default auto: OpenSlide, tiffslide where OpenSlide cannot read the file)")
    t.add_argument("--overlay", type=Path, default=None, help="write a thumbnail PNG with mask and grid")
    t.add_argument("--read", action="store_true", help="also stream every tile and report tiles/s and peak RSS")
    t.add_argument("--workers", type=positive_int, default=2, help="reader threads (with --read)")
    t.add_argument("--batch-size", type=positive_int, default=64, help="tiles per batch (with --read)")
    t.add_argument("--json", action="store_true", help="print the report as one JSON object")
    t.set_defaults(func=run)


def run(args) -> int:
    from ..wsi import GridConfig, TissueConfig, open_slide
    from ..wsi.extract import plan_tiles
    from ..wsi.overlay import write_overlay

    grid_cfg = GridConfig(target_mpp=args.target_mpp, tile_size=args.tile_size, min_tissue=args.min_tissue)
    read_stats = None
    with open_slide(args.slide, mpp_override=args.mpp_override, backend=args.backend) as slide:
        plan = plan_tiles(slide, grid_cfg, TissueConfig(mask_mpp=args.mask_mpp))
        info = slide.info().to_dict()
        if args.overlay:
            write_overlay(slide, plan, args.overlay)
        if args.read:
            read_stats = _read_all(slide, plan.grid, args)
    g = plan.grid
    report = {
        "slide": info,
        "tissue_fraction": round(plan.tissue.tissue_fraction, 4),
        "tissue_threshold": plan.tissue.threshold,
        "mask_shape": list(plan.tissue.mask.shape),
        "tiles": len(g),
        "grid": {"columns": g.grid_shape[0], "rows": g.grid_shape[1], "tile_size": g.tile_size,
                 "target_mpp": g.target_mpp, "tile_size_level0": g.size_level0, "read_level": g.read_level,
                 "read_size": g.read_size, "min_tissue": grid_cfg.min_tissue},
        "overlay": str(args.overlay) if args.overlay else None,
        "read": read_stats,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(args, report, plan, grid_cfg)
    return 0


def _print_report(args, report: dict, plan, grid_cfg) -> None:
    info, g, read_stats = report["slide"], plan.grid, report["read"]
    print(f"{args.slide}: {info['dimensions'][0]}x{info['dimensions'][1]} px, {info['level_dimensions'].__len__()} "
          f"levels, {info['mpp']:g} um/px ({info['mpp_source']}), vendor {info['vendor']}, backend {info['backend']}")
    print(f"tissue: {report['tissue_fraction']:.1%} of the slide (saturation threshold {plan.tissue.threshold})")
    print(f"tiles: {len(g)} of {g.grid_shape[0] * g.grid_shape[1]} grid positions hold >= "
          f"{grid_cfg.min_tissue:.0%} tissue ({g.tile_size} px at {g.target_mpp:g} um/px = {g.size_level0} px "
          f"at level 0, read from level {g.read_level})")
    if args.overlay:
        print(f"overlay: {args.overlay}")
    if read_stats:
        print(f"read: {read_stats['tiles']} tiles in {read_stats['seconds']:.2f} s = {read_stats['tiles_per_s']:.0f} "
              f"tiles/s ({read_stats['workers']} threads); peak RSS {read_stats['peak_rss_before_read_mb']:.0f} MB before "
              f"reading, {read_stats['peak_rss_mb']:.0f} MB after")


def _read_all(slide, grid, args) -> dict:
    """Stream every tile (what the encoder would get) and time it: the reader's own throughput."""
    import resource
    import time

    from ..wsi import TileReader

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    reader = TileReader(slide, grid, batch_size=args.batch_size, workers=args.workers, progress=None)
    n = sum(len(b.tiles) for b in reader)
    dt = time.perf_counter() - t0
    if reader.unreadable:
        from ..errors import warn

        warn(f"{slide.path}: {reader.unreadable} of {len(grid)} tiles unreadable (corrupt data); they were skipped")
    return {"tiles": n, "seconds": round(dt, 3), "tiles_per_s": round(n / dt, 1) if dt else None,
            "workers": args.workers, "batch_size": args.batch_size, "peak_rss_before_read_mb": round(before, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
