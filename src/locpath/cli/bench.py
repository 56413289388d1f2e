"""`locpath bench [BUNDLE]`: per-stage latency, throughput and memory against baselines and machine ceilings."""

from __future__ import annotations

import json
from pathlib import Path

from .common import non_negative_int, positive_int, stdout_reserved


def register(sub) -> None:
    be = sub.add_parser("bench", help="per-stage latency, throughput and memory against baselines and ceilings")
    be.add_argument("bundle", nargs="?", default=None, help="bundle (default: the demo's reference bundle)")
    be.add_argument("--slide", default=None, help="bench this slide (default: a synthetic one)")
    be.add_argument("--tiles", type=positive_int, nargs="+", default=None,
                    help="tissue-tile counts of the synthetic scaling slides (default 1000 10000)")
    be.add_argument("--repeats", type=positive_int, default=3, help="timed runs per stage (default 3)")
    be.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs first (default 1)")
    be.add_argument("--workdir", default="runs/bench", help="where the synthetic bench slides are kept")
    be.add_argument("--no-baselines", action="store_true", help="skip the PyTorch and prefix baselines")
    _add_extras(be)
    be.add_argument("--json", action="store_true",
                    help="print the report as JSON on stdout instead of the Markdown summary (progress on stderr)")
    be.add_argument("--json-file", default=None, metavar="PATH", help="write the JSON report to this file")
    be.add_argument("--markdown", default=None, metavar="PATH", help="write the Markdown summary to this file")
    be.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots into this folder")
    be.add_argument("--quiet", action="store_true", help="no progress lines")
    be.set_defaults(func=run)


def _add_extras(be) -> None:
    """The optional measurements beside the reference bundle's."""
    be.add_argument("--decoder-0.5b", dest="decoder_05b", action="store_true",
                    help="also compare the decoder alone on a Qwen2.5-0.5B shape with onnxruntime-genai INT4 and "
                         "transformers eager (first run builds and exports it: minutes)")
    be.add_argument("--encoder-vit-b", dest="encoder_vitb", action="store_true",
                    help="also compare the tile-encoder recipes (ORT fp32/INT8, OpenVINO bf16/NNCF INT8, PyTorch) on a "
                         "ViT-B/16 shape (first run exports and quantizes it: minutes)")
    be.add_argument("--encoder-vit-l", dest="encoder_vitl", action="store_true",
                    help="also compare the INT8 tile-encoder recipes with PyTorch bf16 at UNI's ViT-L/16 shape "
                         "(first run exports and quantizes it: ~10 minutes on 2 cores)")
    be.add_argument("--encoder-conch", dest="encoder_conch", action="store_true",
                    help="also compare the INT8 tile-encoder recipes with ORT fp32 for CONCH v1 at full depth and "
                         "448 px (int8-safe target: 2x ORT fp32 at min tile cosine 0.995; ~6 minutes on 2 cores)")
    be.add_argument("--encoders-giant", dest="encoders_giant", nargs="?", const="all", default=None, metavar="NAMES",
                    help="also export the ViT-H/ViT-g tile encoders at full depth (random weights; weights past 2 GB "
                         "in tile_encoder.onnx.data) and validate ONNX Runtime fp32 against PyTorch fp32 on real and "
                         "synthetic tiles (max abs diff, min tile cosine, tiles/s on 2 threads), each encoder in its "
                         "own child process with its own peak RSS; NAMES: comma-separated, from uni_v2, virchow2, "
                         "hoptimus0 (covers hoptimus1, the same architecture), gigapath (default: all four; minutes "
                         "each, ~10 GB peak RSS for a ViT-g); a failing encoder is reported and the others run; files "
                         "under --workdir/encoders-giant")
    be.add_argument("--keep-exports", dest="keep_exports", action="store_true",
                    help="with --encoders-giant: keep each exported graph and its .onnx.data (several GB each) "
                         "instead of deleting them after the encoder")
    be.add_argument("--throughput", action="store_true",
                    help="also measure `locpath batch` slides/hour, overlapped against sequential, back to back on "
                         "synthetic ~1k-tile slides (about a minute)")
    be.add_argument("--throughput-slides", type=positive_int, default=4, help="slides per --throughput pass")
    be.add_argument("--published", action="store_true",
                    help="also build and run LoC-Path at published scale: a full-depth Qwen2.5-7B-shaped random model "
                         "written as shards here, its INT4 decoder streamed from them (build time, peak RSS, bundle "
                         "size, tokens/s, time to first token at --tiles), beside onnxruntime-genai's builder on the "
                         "same shards where it fits in memory (first run: ~15 GB of shards, tens of minutes)")
    be.add_argument("--no-published-vision", dest="published_vision", action="store_false",
                    help="with --published: skip the bundle whose vision graphs are on OpenVINO (int8-safe CONCH, "
                         "bf16 resampler; its build takes minutes) and the synthetic slide asked through it")
    be.add_argument("--published-synthetic-tiles", dest="published_synthetic_tiles", type=non_negative_int,
                    default=1000, help="with --published: tissue tiles of the synthetic slide asked cold through the "
                                       "OpenVINO-vision bundle (default 1000; 0: none)")
    be.add_argument("--published-encoders", dest="published_encoders", nargs="+", default=[], metavar="NAME",
                    choices=_encoder_names(),
                    help="with --published: also a bundle of each of these registered encoders at full depth, built "
                         "int8-safe on OpenVINO by locpath build, its per-tile checks and tiles/s against its ORT "
                         "fp32 graph (a few minutes each)")
    be.add_argument("--headline-0.5b", dest="headline_05b", action="store_true",
                    help="also measure the headline (LoC-Path vs the prefix baseline, both on ONNX Runtime INT4) on a "
                         "Qwen2.5-0.5B-shaped LLM (first run builds both: minutes; 10k tiles: minutes per side)")
    be.add_argument("--headline-0.5b-tiles", dest="headline_05b_tiles", type=positive_int, nargs="+", default=None,
                    help="tile counts for --headline-0.5b (default: --tiles)")


def _encoder_names() -> list[str]:
    from ..encoders import ENCODERS

    return sorted(ENCODERS)


def _batch_pass():
    """The batch runner's pass for `bench --throughput` (bench and batch are siblings: the CLI joins them)."""
    from ..batch.runner import run_pass

    return run_pass


def _config(args):
    from ..bench.encoders_giant import giant_names
    from ..bench.runner import BenchConfig

    giant = None if args.encoders_giant is None else giant_names(args.encoders_giant)  # before any bundle is made
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        from ..demo import _workdir, default_bundle

        bundle = default_bundle(_workdir(None))
    return BenchConfig(bundle=bundle, slide=Path(args.slide) if args.slide else None,
                       tiles=[] if args.slide and not args.tiles else (args.tiles or [1000, 10000]),
                       repeats=args.repeats, warmup=args.warmup, workdir=Path(args.workdir),
                       baselines=not args.no_baselines, progress=not args.quiet, decoder_05b=args.decoder_05b,
                       encoder_vitb=args.encoder_vitb, encoder_vitl=args.encoder_vitl, encoder_conch=args.encoder_conch,
                       encoders_giant=giant,
                       keep_exports=args.keep_exports,
                       published=args.published, published_vision=args.published_vision,
                       published_synthetic_tiles=args.published_synthetic_tiles,
                       published_encoders=args.published_encoders,
                       headline_05b=args.headline_05b, headline_tiles_05b=args.headline_05b_tiles,
                       throughput_pass=_batch_pass() if args.throughput else None,
                       throughput_slides=args.throughput_slides)


def run(args) -> int:
    from ..bench.output import markdown, write_json, write_markdown, write_plots
    from ..bench.runner import check_inputs, run_bench

    with stdout_reserved(args.json) as real_stdout:  # with --json, stdout carries the report alone
        cfg = _config(args)
        check_inputs(cfg)
        report = run_bench(cfg)
        if args.json_file:
            write_json(report, args.json_file)
        if args.markdown:
            write_markdown(report, args.markdown)
        if args.plots:
            write_plots(report, args.plots)
        if args.json:
            real_stdout.write(json.dumps(report, indent=2, default=float) + "\n")
            real_stdout.flush()
    if not args.json:
        print(markdown(report))
    return 0
