"""`locpath batch BUNDLE --slides ... --questions ... --out ...`: every slide asked every question, one record per
slide, resumable; in this process or on a Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LocpathError
from ..runtime.options import RuntimeOptions, add_runtime_options, runtime_options
from .common import positive_float, positive_int, probability, retell, stdout_reserved

DEFAULTS = RuntimeOptions(memory_slides=1)  # each slide is met once


def register(sub) -> None:
    bt = sub.add_parser("batch", help="every slide of a folder or list asked every question: one record per slide, "
                                      "resumable; in this process or on a Ray cluster")
    bt.add_argument("bundle", help="a bundle folder (locpath export / build)")
    bt.add_argument("--slides", required=True, help="a folder of slides (and DICOM series folders), a list file (one path per line) or one slide file")
    bt.add_argument("--questions", required=True, help="a text file, one question per line (or a JSON list)")
    bt.add_argument("--out", required=True, help="output folder: records/, features/, answers.jsonl, summary.json")
    bt.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl",
                    help="the combined answers file (parquet needs pyarrow)")
    bt.add_argument("--ray", action="store_true", help="run on a local Ray cluster started for this run")
    bt.add_argument("--ray-address", default=None, metavar="HOST:PORT", help="run on this Ray cluster")
    bt.add_argument("--workers", type=positive_int, default=2, help="Ray: encoder actors (default 2)")
    bt.add_argument("--cpus-per-worker", type=positive_float, default=1.0,
                    help="Ray: CPUs each worker reserves (and its intra-op threads, unless --threads)")
    bt.add_argument("--gpus-per-worker", type=float, default=0.0, help="Ray: GPUs each worker reserves (with --device cuda)")
    bt.add_argument("--no-overlap", action="store_true",
                    help="in process: one slide after another (default: the next slides are read, encoded and "
                         "compressed while one slide's questions are answered)")
    bt.add_argument("--lanes", type=positive_int, default=2,
                    help="in process, overlapped: slides staged at once ahead of the one answered (default 2)")
    bt.add_argument("--max-new-tokens", type=positive_int, default=None, help="cap on each answer's length")
    bt.add_argument("--abstain-below", type=probability, default=None, metavar="P",
                    help="answer 'uncertain' below this confidence (0-1); the record keeps the decoded answer in its "
                         "trust.raw_answer")
    bt.add_argument("--json", action="store_true", help="print the run's summary as one JSON object on stdout")
    bt.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    add_runtime_options(bt, DEFAULTS)
    retell(bt, "--threads", "intra-op threads per pipeline (default: the cores, shared out over --lanes when "
                            "overlapped; on Ray, --cpus-per-worker)")
    retell(bt, "--cache-dir", "slide cache (shared by all workers; default ~/.cache/locpath/slides)")
    bt.set_defaults(func=run)


def batch_config(args):
    from ..batch.settings import BatchConfig

    return BatchConfig(bundle=Path(args.bundle), slides=Path(args.slides), questions=Path(args.questions),
                       out=Path(args.out), fmt=args.format, sampling={"max_new_tokens": args.max_new_tokens,
                                                                 "abstain_below": args.abstain_below},
                       ray=args.ray, ray_address=args.ray_address, workers=args.workers,
                       cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                       progress=not args.quiet, overlap=not args.no_overlap, lanes=args.lanes,
                       runtime=runtime_options(args, DEFAULTS))


def run(args) -> int:
    from ..batch.runner import run_batch
    from ..fsutil import atomic_file

    cfg = batch_config(args)
    with stdout_reserved(args.json) as real_stdout:
        summary = run_batch(cfg)
        with atomic_file(Path(args.out) / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        if args.json:
            real_stdout.write(json.dumps(summary) + "\n")
            real_stdout.flush()
    if not args.json:
        print(f"batch: {summary['done']} slides done, {summary['skipped']} already done, {summary['failed']} failed in "
              f"{summary['seconds']:.1f} s ({summary['slides_per_hour']:.0f} slides/hour, {summary['runner']}); "
              f"{summary['records']} records in {summary['output']}")
    if summary["failed"]:
        first = summary["failures"][0]
        raise LocpathError(f"{summary['failed']} of {summary['slides']} slides failed (first: {first['error']}); "
                           f"see {Path(args.out) / 'summary.json'}")
    return 0
