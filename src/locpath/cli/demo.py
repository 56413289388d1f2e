"""`locpath demo`: the README's main job end to end on the shipped reference model (locpath/demo.py)."""

from __future__ import annotations

from ..runtime.options import RuntimeOptions, add_runtime_options, runtime_options
from .common import retell

DEFAULTS = RuntimeOptions()


def register(sub) -> None:
    d = sub.add_parser("demo", help="the shipped reference bundle (torch-free) on three synthetic slides: every "
                                    "question type streamed beside the ground truth, with timings",
                       description="Runs the prebuilt reference bundle shipped in the package (no torch needed) on "
                                   "three synthetic slides it writes into the work folder, asks every question type "
                                   "about each and prints each streamed answer beside the ground truth, with the time "
                                   "to first token and the accuracy. Later runs reuse the slides and the slide cache, "
                                   "so answers start within seconds. Only if the shipped bundle is missing or damaged "
                                   "is the shipped checkpoint exported into the work folder (needs torch).")
    d.add_argument("--workdir", default=None,
                   help="where the slides, the slide cache (and an export, if needed) live (default ~/.cache/locpath/demo)")
    d.add_argument("--bundle", default=None, help="run the demo with this bundle (default: the shipped reference "
                                                  "bundle; the shipped checkpoint is exported into the work folder "
                                                  "only if that bundle is missing or damaged)")
    add_runtime_options(d, DEFAULTS)
    retell(d, "--cache-dir", "slide cache folder (default WORKDIR/slide-cache)")
    d.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo

    return run_demo(args.workdir, args.bundle, runtime_options(args, DEFAULTS))
