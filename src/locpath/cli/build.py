"""`locpath build BUNDLE OUT`: a quantized or compiled bundle from an fp32 bundle, with an optional report."""

from __future__ import annotations

import json
from pathlib import Path

from .common import positive_int, quiet_if


def register(sub) -> None:
    bd = sub.add_parser("build", help="a quantized or compiled bundle from an fp32 bundle")
    bd.add_argument("bundle", help="the fp32 bundle (locpath export)")
    bd.add_argument("out", help="bundle folder to create")
    bd.add_argument("--precision", default="int8", help="ort: fp32, int8, int8-static, int4, int8-encoder, fp16; openvino: bf16, fp32, int8, int8-safe (each +int4 optional: the decoders INT4 on ONNX Runtime, or +int4-ov: the INT4 fused decoder on OpenVINO); "
                         "tensorrt: fp16, fp32; auto: measure the CPU candidates per stage and keep the fastest")
    bd.add_argument("--backend", choices=("ort", "openvino", "tensorrt"), default="ort",
                    help="the runtime the bundle is built for (default ort: ONNX Runtime)")
    bd.add_argument("--calibration", default=None, help="npz from `locpath calibrate`")
    bd.add_argument("--slides", nargs="+", default=None, help="calibrate on these slides first")
    bd.add_argument("--int4-block-size", type=int, default=32,
                    help="weights per INT4 scale in the decoders (16-256; 32 default; 128 reads ~15%% fewer bytes per token)")
    bd.add_argument("--prefill", choices=("auto", "none", "int8", "int8-nbits", "int4"), default="auto",
                    help="the fused decoder's prefill graph (decoder_fused_prefill; INT4 builds on ONNX Runtime): auto "
                         "adds the INT8 (AMX U8S8) graph when it prefills faster with the same greedy tokens")
    bd.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    bd.add_argument("--report", action="store_true", help="cosine, agreement, accuracy and speed vs fp32")
    bd.add_argument("--seed", type=int, default=1, help="held-out seed for --report")
    bd.add_argument("--count", type=positive_int, default=10, help="held-out slides for --report")
    bd.add_argument("--json", action="store_true", help="print the build summary as one JSON object")
    bd.set_defaults(func=run)


def run(args) -> int:
    log = quiet_if(args.json)
    cal = _calibration(args, log)
    if args.precision == "auto":  # a measurement on this machine, then a build (bench/auto.py)
        from ..bench.auto import build_auto

        out = build_auto(Path(args.bundle), Path(args.out), cal, overwrite=args.overwrite, log=log,
                         int4_block_size=args.int4_block_size, prefill=args.prefill)
    else:
        from ..engines.build import build_bundle

        out = build_bundle(args.bundle, args.out, args.precision, backend=args.backend, calibration=cal,
                           overwrite=args.overwrite, log=log, int4_block_size=args.int4_block_size,
                           prefill=args.prefill)
    summary = {"bundle": str(out), "precision": args.precision, "backend": args.backend}
    if args.report:
        from ..bench.report import build_report

        tiles = cal.tiles() if cal is not None else _report_tiles(args)
        summary["report"] = build_report(args.bundle, {args.precision: out}, tiles, args.seed, args.count, log=log)
        if not args.json:
            _print_report(summary["report"])
    if args.json:
        print(json.dumps(summary))
    return 0


def _calibration(args, log):
    if args.calibration:
        from ..calibration.sets import CalibrationSet

        return CalibrationSet.load(args.calibration)
    if args.slides:
        from ..calibration.sets import build_calibration

        return build_calibration(args.bundle, args.slides, log=log)
    return None


def _print_report(report: dict) -> None:
    for name, r in report["precisions"].items():
        print(f"{name:12s} [{r['decoder']}] cosine {r['feature_cosine_mean']:.5f} (min {r['feature_cosine_min']:.5f})  "
              f"accuracy {r['accuracy']:.3f}  agreement {r['answer_agreement']:.3f}  "
              f"tiles/s {r['tiles_per_s']:.0f} ({r['tiles_per_s_vs_fp32']:.2f}x)  "
              f"decode tok/s {r['decode_tokens_per_s']:.0f} ({r['decode_vs_fp32']:.2f}x)")


def _report_tiles(args):
    """Held-out synthetic tissue tiles for the cosine and speed columns when no calibration set is given."""
    import numpy as np

    from ..synth import make_spec
    from ..synth.seeds import split_seed
    from ..train.data import render_tile, tissue_tiles

    spec = make_spec(split_seed(args.seed + 1000, "eval", 0))
    tt = tissue_tiles(spec)
    return np.stack([render_tile(spec, c, r) for c, r in tt.grid[:96]])
