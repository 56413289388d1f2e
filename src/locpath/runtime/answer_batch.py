"""Answers about prepared slides decoded as one batch, at the level of questions and text: each added question
runs its TIS and cross-KV, takes a free row of the batch generator (runtime/batch_generator.py) and streams its
pieces; a finished answer frees its row for the next question. Used by `Pipeline.answer_many`/`ask_many` (the
questions of one slide), `chat` (the questions waiting on stdin) and the service's question lane (concurrent
requests, added while others decode).

    batch = pipe.batch(rows=4)
    batch.add(ctx, "What is the diagnosis?", pipe.sampling(), tag="a")
    while batch.active:
        for ev in batch.step():     # BatchEvent(tag, piece) ... then BatchEvent(tag, answer=Answer) or error
            ...
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import LocpathError
from .batch_generator import batch_generator
from .detok import StreamingDetokenizer
from .generator import GenerationStats
from .sampler import SamplingParams


@dataclass
class BatchEvent:
    tag: object
    piece: str | None = None  # decoded text, as it comes
    answer: object = None  # the Answer, once this question ended
    error: str | None = None  # this question failed alone (the others go on)


@dataclass
class _Live:
    tag: object
    ctx: object
    question: str
    params: SamplingParams
    qkv: object
    stats: GenerationStats
    detok: StreamingDetokenizer
    timings: dict
    t_start: float
    first: float | None = None
    extra: dict = field(default_factory=dict)


class AnswerBatch:
    def __init__(self, pipe, rows: int):
        self.pipe = pipe
        self.gen = batch_generator(pipe.decoder_state, rows, pipe.max_length, pipe.stop_ids)
        self.live: dict[int, _Live] = {}

    @property
    def rows(self) -> int:
        return len(self.gen.rows)

    @property
    def free(self) -> int:
        return self.gen.free

    @property
    def active(self) -> bool:
        return bool(self.live)

    def add(self, ctx, question: str, params: SamplingParams, tag=None, t_start: float | None = None) -> None:
        """TIS, cross-KV and prefill of one question about a prepared slide (LocpathError if it cannot run)."""
        t_start = t_start if t_start is not None else time.perf_counter()
        prompt = self.pipe.check_question(question, params)
        timings = dict(ctx.timings_ms)
        qkv = self.pipe.question_kv(ctx.latents, question, timings)
        stats = GenerationStats()
        slot = self.gen.add(qkv.cross, prompt, params, stats)
        self.live[slot] = _Live(tag, ctx, question, params, qkv, stats, StreamingDetokenizer(self.pipe.tokenizer),
                                timings, t_start)

    def cancel(self, tag) -> bool:
        """Drop the question added with `tag` (its client went away); its row is free at once."""
        for slot, live in list(self.live.items()):
            if live.tag == tag:
                self.gen.release(slot)
                del self.live[slot]
                return True
        return False

    def step(self) -> list[BatchEvent]:
        """One decoder step for every live question: its new text, or its Answer when it ended."""
        events = []
        for slot, tok in self.gen.step():
            live = self.live.get(slot)
            if live is None:
                continue
            if tok is not None:
                live.first = live.first or time.perf_counter()
                piece = live.detok.push(tok)
                if piece:
                    events.append(BatchEvent(live.tag, piece=piece))
                continue
            del self.live[slot]
            if live.stats.error:
                events.append(BatchEvent(live.tag, error=live.stats.error))
                continue
            answer = self.pipe.make_answer(live.ctx, live.question, live.params, live.qkv, live.stats, live.detok,
                                           live.timings, live.t_start, live.first, batch_rows=self.rows)
            events.append(BatchEvent(live.tag, answer=answer))
        return events

    def run(self, jobs: list[tuple], on_piece=None, on_answer=None) -> list:
        """Answers to `jobs` = [(ctx, question, params)], in order; `on_piece(index, text)` as text is decoded,
        `on_answer(index, Answer)` as each ends."""
        answers: list = [None] * len(jobs)
        pending = list(enumerate(jobs))
        t_start = time.perf_counter()
        while pending or self.active:
            while pending and self.free:
                i, (ctx, q, params) = pending.pop(0)
                self.add(ctx, q, params, tag=i, t_start=t_start)
            for ev in self.step():
                if ev.error is not None:
                    raise LocpathError(ev.error)
                if ev.answer is not None:
                    answers[ev.tag] = ev.answer
                    if on_answer is not None:
                        on_answer(ev.tag, ev.answer)
                elif on_piece is not None:
                    on_piece(ev.tag, ev.piece)
        return answers
