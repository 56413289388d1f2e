"""`locpath ask BUNDLE SLIDE QUESTION...`: streamed answers with timings, or one JSON document (--json)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import LocpathError
from .answering import (add_answer_options, add_dicom_options, dicom_source, pipeline, sampling, timing_lines,
                        trust_lines, write_dicom)
from .common import PartialAnswers, answers_json, error_message, retell

FEATURE_FILES = (".h5", ".hdf5", ".csv")


def register(sub) -> None:
    a = sub.add_parser("ask", help="answer questions about a slide with a bundle (torch-free)")
    a.add_argument("bundle", help="a bundle folder (locpath export / build)")
    a.add_argument("slide", help="a slide file, a DICOM series folder, or a feature file: TRIDENT/CLAM .h5 (any "
                   "alias of the bundle's encoder) or SlideChat .csv (no tile positions: no STM merges, no heatmap)")
    a.add_argument("questions", nargs="+", help="one or more questions")
    a.add_argument("--json", action="store_true",
                   help='print {"schema": "locpath-answers/1", "answers": [...]} (with "error" on a failure)')
    a.add_argument("--evidence", type=Path, default=None, metavar="OUT.png",
                   help="draw the tiles that weighed most for the last question as a heatmap over the thumbnail")
    add_dicom_options(a)
    add_answer_options(a)
    retell(a, "--decode-batch", "decode up to N questions as one batch, each printed once it and the ones before it "
                                "end; answers equal one-by-one answers; 1 = one at a time, streamed (default 8)")
    a.set_defaults(func=run)


def run(args) -> int:
    answers: list = []  # what a failure under --json reports beside its error
    try:
        _ask(args, answers)
    except BrokenPipeError:
        raise
    except (LocpathError, OSError) as exc:
        if not (args.json or answers):
            raise
        raise PartialAnswers(error_message(exc), answers, as_json=args.json) from exc
    return 0


def _check(args) -> None:
    for i, q in enumerate(args.questions, 1):
        if not q.strip():
            raise LocpathError(f"question {i} is empty")
    if args.evidence is not None and args.evidence.suffix.lower() != ".png":
        raise LocpathError(f"{args.evidence}: --evidence must name a .png file")
    if args.evidence is not None and Path(args.slide).suffix.lower() in FEATURE_FILES:
        raise LocpathError(f"{args.slide}: --evidence draws over a slide file's thumbnail; a feature file has none")


def _questions(pipe, args) -> list:
    """Every question checked (once) before any output: the Questions the pipeline answers."""
    questions = []
    for i, q in enumerate(args.questions, 1):
        try:
            questions.append(pipe.question(q, **sampling(args)))
        except LocpathError as exc:
            raise LocpathError(f"question {i}: {exc}") from None
    return questions


def _ask(args, answers: list) -> None:
    """Every answer is appended to `answers` as it is given."""
    _check(args)
    source = dicom_source(args)  # a DICOM slide's series, before any work (None without --dicom-sr/--dicom-ann)
    pipe = pipeline(args)
    questions = _questions(pipe, args)
    if len(questions) > 1 and args.decode_batch > 1:  # decoded as one batch: answers printed as they end
        answers.extend(_ask_batched(pipe, args, questions))
    else:
        t_start = time.perf_counter()  # the first answer's time to first token counts the slide's preparation
        ctx = pipe.prepare(args.slide, mpp_override=args.mpp_override)
        for i, q in enumerate(questions):  # the first answer carries the slide's preparation timings
            stream = pipe.stream(ctx, q, t_start=t_start) if i == 0 else pipe.stream(ctx.again({}), q)
            answers.append(_printed(stream) if not args.json else _drained(stream))
    if args.evidence is not None:  # before the JSON: a failure here is reported in the one document
        _write_evidence(args, answers[-1])
    if source is not None:
        write_dicom(args, pipe, source, answers)
    if args.json:
        print(answers_json(answers))


def _drained(stream):
    for _ in stream:
        pass
    return stream.result


def _printed(stream):
    print(f"Q: {stream.question.text}\nA: ", end="", flush=True)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    for line in trust_lines(stream.result) + timing_lines(stream.result):
        print(line)
    return stream.result


def _ask_batched(pipe, args, questions: list) -> list:
    """Every question decoded as one batch; without --json each answer is printed, in question order, once it
    and the ones before it have ended."""
    done: dict = {}
    shown = [0]

    def on_answer(i: int, a) -> None:
        done[i] = a
        while shown[0] in done:
            a = done[shown[0]]
            print(f"Q: {a.question}\nA: {a.answer}", flush=True)
            for line in trust_lines(a) + timing_lines(a):
                print(line)
            shown[0] += 1

    return pipe.ask(args.slide, questions, mpp_override=args.mpp_override,
                    on_answer=None if args.json else on_answer)


def _write_evidence(args, answer) -> None:
    """The last answer's evidence as a heatmap over the slide's thumbnail (a slide file, not a feature file)."""
    from ..wsi import open_slide
    from ..wsi.overlay import write_evidence

    ev = answer.evidence
    if ev is None or Path(args.slide).suffix.lower() in FEATURE_FILES:
        raise LocpathError(f"{args.slide}: --evidence draws over a slide file's thumbnail; a feature file has none")
    with open_slide(args.slide, mpp_override=args.mpp_override) as s:
        out = write_evidence(s, ev.coords, ev.weights, ev.tile_size_level0, args.evidence)
    print(f"evidence: {out} (the {len(ev.top(1000))} tiles that weighed most for the last question, in red)",
          file=sys.stderr)

