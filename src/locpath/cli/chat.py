"""`locpath chat BUNDLE SLIDE`: questions from stdin about one prepared slide; lines waiting together are decoded
as one batch."""

from __future__ import annotations

import sys

from ..errors import LocpathError
from .answering import add_answer_options, pipeline, sampling, timing_lines, trust_lines
from .common import PartialAnswers, error_message, retell


def register(sub) -> None:
    c = sub.add_parser("chat", help="several questions in a row about one slide (reads questions from stdin)")
    c.add_argument("bundle", help="a bundle folder (locpath export / build)")
    c.add_argument("slide", help="a slide file, a DICOM series folder or a feature file (as `locpath ask`)")
    add_answer_options(c)
    retell(c, "--decode-batch", "decode up to N questions waiting on stdin together (a pasted block, a pipe) as one "
                                "batch; answers equal one-by-one answers; 1 = one at a time, streamed (default 8)")
    c.set_defaults(func=run)


def run(args) -> int:
    answers: list = []
    try:
        _chat(args, answers)
    except BrokenPipeError:
        raise
    except (LocpathError, OSError) as exc:
        if not answers:
            raise
        raise PartialAnswers(error_message(exc), answers) from exc
    return 0


def _chat(args, answers: list) -> None:
    pipe = pipeline(args)
    print(f"preparing {args.slide} ...", file=sys.stderr, flush=True)
    ctx = pipe.prepare(args.slide, mpp_override=args.mpp_override)
    print(f"ready: {ctx.tiles} tiles, {ctx.tokens} tokens after STM ({'cached' if ctx.cache_hit else 'encoded'}). "
          "Ask a question; an empty line or 'exit' ends.", file=sys.stderr, flush=True)
    for batch in _stdin_batches(args.decode_batch):
        questions, end = _questions(pipe, sampling(args), batch)
        if len(questions) == 1:
            print("A: ", end="", flush=True)
            stream = pipe.stream(ctx.again({}), questions[0])
            for piece in stream:
                print(piece, end="", flush=True)
            print()
            for line in trust_lines(stream.result):
                print(line, flush=True)
            print(timing_lines(stream.result)[0], file=sys.stderr, flush=True)
            answers.append(stream.result)
        elif questions:  # several questions were waiting: one batch, answers in order
            for a in pipe.answer(ctx.again({}), questions):
                print(f"A: {a.answer}", flush=True)
                for line in trust_lines(a):
                    print(line, flush=True)
                print(timing_lines(a)[0], file=sys.stderr, flush=True)
                answers.append(a)
        if end:
            break


def _questions(pipe, options: dict, batch) -> tuple[list, bool]:
    """The batch's askable questions (each other line refused on its own, the session goes on), and whether an
    empty line or exit ended the session."""
    questions = []
    for q, problem in batch:
        if problem is None and (not q or q.lower() in ("exit", "quit")):
            return questions, True
        try:
            if problem is not None:
                raise LocpathError(problem)
            questions.append(pipe.question(q, **options))
        except LocpathError as exc:
            print(f"locpath: error: {exc}; ask again", file=sys.stderr, flush=True)
    return questions, False


def _stdin_lines():
    """Questions from stdin, one per line, as bytes decoded one line at a time: a line that is not UTF-8 is
    refused on its own and the session goes on."""
    source = getattr(sys.stdin, "buffer", None) or sys.stdin  # bytes from a terminal or pipe; text when embedded
    for raw in source:
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            line.encode("utf-8")  # text streams carry undecodable bytes as surrogates
            yield line.strip(), None
        except (UnicodeDecodeError, UnicodeEncodeError):
            yield None, "that line is not valid UTF-8 text"


def _stdin_batches(limit: int):
    """Lists of (line, problem) from stdin: the first line waits; the lines already waiting behind it (a pasted
    block, a pipe) join it, up to `limit`, so they are decoded as one batch. Typed questions come one at a time."""
    import queue
    import threading
    import time

    lines: queue.Queue = queue.Queue()

    def read():
        for item in _stdin_lines():
            lines.put(item)
        lines.put(None)

    threading.Thread(target=read, name="locpath-stdin", daemon=True).start()
    while (item := lines.get()) is not None:
        batch = [item]
        time.sleep(0.02)  # a pasted block or a pipe delivers its lines together
        while len(batch) < limit:
            try:
                nxt = lines.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                yield batch
                return
            batch.append(nxt)
        yield batch
