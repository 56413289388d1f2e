"""What `ask` and `chat` share: the bundle's Pipeline from the runtime flags, the slide and sampling flags, the
timing lines printed under each answer, and the answers as DICOM objects (--dicom-sr, --dicom-ann)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LocpathError
from ..runtime.options import RuntimeOptions, add_runtime_options, runtime_options
from .common import non_negative_int, positive_float, positive_int, probability

DEFAULTS = RuntimeOptions()


def add_answer_options(p: argparse.ArgumentParser) -> None:
    """The runtime flags, the slide's --mpp-override and the sampling flags."""
    p.add_argument("--mpp-override", type=positive_float, default=None,
                   help="level-0 microns per pixel (when the slide's own is missing or wrong)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="answer length cap (default: the bundle's; must fit the KV cache with the prompt)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=None, help="with --sample; (0, 100]")
    p.add_argument("--top-k", type=non_negative_int, default=None, help="with --sample; 0 = off")
    p.add_argument("--top-p", type=positive_float, default=None, help="with --sample; (0, 1]")
    p.add_argument("--repetition-penalty", type=positive_float, default=None, help="(0, 100]; 1 = off")
    p.add_argument("--seed", type=non_negative_int, default=None, help="sampling seed (>= 0)")
    p.add_argument("--abstain-below", type=probability, default=None, metavar="P",
                   help="answer 'uncertain' when the answer's confidence is below P (0-1; the decoded answer is kept "
                        "in --json's trust.raw_answer); the answer is then printed whole when it ends")
    add_runtime_options(p, DEFAULTS)


def pipeline(args):
    from ..runtime.pipeline import Pipeline

    return Pipeline.from_bundle(args.bundle, runtime_options(args, DEFAULTS))


def sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample or None, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                abstain_below=args.abstain_below)


def timing_lines(ans) -> list[str]:
    t = ans.timings_ms
    order = ["hash", "cache_read", "open", "tissue_grid", "tiles_encode", "tile_read_wait", "encode", "stm",
             "resampler", "tis", "cross_kv", "prefill", "decode_per_token", "time_to_first_token", "total"]
    cells = [f"{k} {t[k]:.1f}" for k in order if k in t]
    s = ans.slide
    return [f"  timings (ms): {', '.join(cells)}",
            f"  slide: {s['tiles']} tiles -> {s['tokens_after_stm']} tokens after STM, "
            f"{'cached (no tile read)' if s['cache_hit'] else str(s['tiles_read']) + ' tiles read'}; "
            f"{ans.generation['new_tokens']} new tokens; peak RSS {ans.peak_rss_mb:.0f} MB"]


def trust_lines(ans) -> list[str]:
    """The answer's confidence and each warning, in words (runtime/trust.py)."""
    t = ans.trust or {}
    if t.get("confidence") is None:
        return []
    how = "calibrated" if t.get("calibrated") else "uncalibrated: the bundle has no trust.json"
    raw = f"; abstained (decoded answer: {t['raw_answer']!r})" if t.get("abstained") else ""
    return [f"  confidence {t['confidence']:.3f} ({how}){raw}"] + \
        [f"  WARNING: {w['message']}" for w in t.get("warnings", [])]


# -- DICOM output (ask --dicom-sr / --dicom-ann) ----------------------------------------------------------------------
def add_dicom_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dicom-sr", type=Path, default=None, metavar="OUT.dcm",
                   help="write a DICOM Structured Report of the answers (a DICOM slide only: a series folder or one "
                        "of its .dcm files): questions, answers, model identity and the evidence tiles as regions "
                        "on the slide, in the slide's study")
    p.add_argument("--dicom-ann", type=Path, default=None, metavar="OUT.dcm",
                   help="write the evidence tiles as DICOM Microscopy Bulk Simple Annotations on the slide (a DICOM "
                        "slide only)")


def dicom_source(args):
    """The DICOM slide's series, read and the outputs checked before any work (None without --dicom-*)."""
    if args.dicom_sr is None and args.dicom_ann is None:
        return None
    from ..dicomout.files import check_target
    from ..dicomout.sources import read_source

    if args.dicom_sr is not None and args.dicom_ann is not None and \
            args.dicom_sr.resolve() == args.dicom_ann.resolve():  # also through links and ..
        raise LocpathError(f"{args.dicom_sr}: --dicom-sr and --dicom-ann name the same file")
    for path, option in ((args.dicom_sr, "--dicom-sr"), (args.dicom_ann, "--dicom-ann")):
        if path is not None:
            check_target(path, option)
    return read_source(args.slide)


def write_dicom(args, pipe, source, answers: list) -> None:
    """The SR and/or the bulk annotations of the answers, each written atomically."""
    from ..dicomout import build_objects
    from ..dicomout.files import write_dataset
    from ..dicomout.identity import pipeline_identity

    sr, ann = build_objects(source, pipeline_identity(pipe), [a.to_dict() for a in answers],
                            annotations=args.dicom_ann is not None)
    if args.dicom_ann is not None and ann is None:
        raise LocpathError(f"{args.dicom_ann}: no evidence tile with a position to annotate")
    for path, ds, what in ((args.dicom_sr, sr, "structured report"), (args.dicom_ann, ann, "annotations")):
        if path is not None:
            write_dataset(ds, path)
            print(f"dicom: {path} ({what}, SOP instance {ds.SOPInstanceUID}, study {source.study_uid})",
                  file=sys.stderr)
