"""Answers about prepared slides, at the level of questions and text, over the one decoding loop
(runtime/generator.py): each added question runs its TIS and cross-KV, takes a free row and streams its pieces; a
finished answer frees its row for the next question. Every way of answering goes through it: `Pipeline.answer` and
`stream` (one batch; a single question is a batch of one row), `chat` and the service's question lane (questions
added while others decode: continuous batching).

    batch = pipe.batch(rows=4)
    batch.add(ctx, pipe.question("What is the diagnosis?"), tag="a")
    while batch.active:
        for ev in batch.step():     # BatchEvent(tag, piece) ... then BatchEvent(tag, answer=Answer) or error
            ...
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import LocpathError
from .detok import StreamingDetokenizer
from .generator import GenerationStats, Generator
from .question import Question
from .results import Answer, _ms, peak_rss_mb
from .sampler import SamplingParams
from .trust import UNCERTAIN, answer_trust


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
    question: Question
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
        trust = getattr(pipe, "trust", None)
        self.gen = Generator(pipe.decoder_state, rows, pipe.max_length, pipe.stop_ids,
                             confidence_temperature=trust.temperature if trust is not None else 1.0)
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

    def add(self, ctx, question: Question, tag=None, t_start: float | None = None) -> None:
        """TIS, cross-KV and prefill of one question (checked: `Pipeline.question`) about a prepared slide."""
        t_start = t_start if t_start is not None else time.perf_counter()
        timings = dict(ctx.timings_ms)
        qkv = self.pipe.question_kv(ctx.latents, question, timings)
        stats = GenerationStats(kept_logits=[] if getattr(self.pipe, "keep_logits", False) else None)
        slot = self.gen.add(qkv.cross, question.prompt_ids, question.params, stats)
        self.live[slot] = _Live(tag, ctx, question, qkv, stats, StreamingDetokenizer(self.pipe.tokenizer),
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
                if piece and live.question.abstain_below is None:  # abstaining: the text comes whole, at the end
                    events.append(BatchEvent(live.tag, piece=piece))
                continue
            del self.live[slot]
            if live.stats.error:
                events.append(BatchEvent(live.tag, error=live.stats.error))
                continue
            answer = make_answer(self.pipe, live.ctx, live.question.text, live.question.params, live.qkv, live.stats,
                                 live.detok, live.timings, live.t_start, live.first, batch_rows=self.rows,
                                 abstain_below=live.question.abstain_below)
            if live.question.abstain_below is not None and answer.answer:
                events.append(BatchEvent(live.tag, piece=answer.answer))
            events.append(BatchEvent(live.tag, answer=answer))
        return events

    def run(self, jobs: list[tuple], on_piece=None, on_answer=None, t_start: float | None = None) -> list:
        """Answers to `jobs` = [(ctx, Question)], in order; `on_piece(index, text)` as text is decoded,
        `on_answer(index, Answer)` as each ends. A question that fails raises its LocpathError."""
        answers: list = [None] * len(jobs)
        pending = list(enumerate(jobs))
        t_start = t_start if t_start is not None else time.perf_counter()
        while pending or self.active:
            while pending and self.free:
                i, (ctx, q) = pending.pop(0)
                self.add(ctx, q, tag=i, t_start=t_start)
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

    def pieces(self, ctx, question: Question, t_start: float):
        """One question alone, as a generator of text pieces that returns its Answer (`Pipeline.stream`)."""
        self.add(ctx, question, tag=0, t_start=t_start)
        answer = None
        while self.active:
            for ev in self.step():
                if ev.error is not None:
                    raise LocpathError(ev.error)
                if ev.piece is not None:
                    yield ev.piece
                elif ev.answer is not None:
                    answer = ev.answer
        return answer


def make_answer(pipe, ctx, question: str, params: SamplingParams, qkv, stats: GenerationStats,
                detok: StreamingDetokenizer, timings: dict, t_start: float, first: float | None,
                batch_rows: int = 1, abstain_below: float | None = None):
    """The Answer of a finished generation (one row of a batch, or a batch of one), with its trust field; with
    `abstain_below`, an answer less confident than that reads "uncertain" (the decoded one kept in trust)."""

    timings["prefill"] = round(stats.prefill_ms, 2)
    timings["decode_per_token"] = round(stats.decode_ms_per_token, 3)
    timings["decode_total"] = round(float(np.sum(stats.decode_ms)), 2)
    timings["time_to_first_token"] = round(((first or time.perf_counter()) - t_start) * 1000, 2)
    timings["total"] = _ms(t_start)
    text = detok.text().strip()
    trust = answer_trust(getattr(pipe, "trust", None), ctx.trust, stats.token_logprobs, abstain_below)
    if trust["abstained"]:
        trust["raw_answer"] = text
        text = UNCERTAIN
    return Answer(
        question=question, answer=text, trust=trust, kept_logits=stats.kept_logits, token_ids=list(detok.ids),
        timings_ms=timings,
        peak_rss_mb=peak_rss_mb(), evidence=pipe.evidence(ctx, qkv),
        slide={"source": ctx.source, "tiles": ctx.tiles, "tokens_after_stm": ctx.tokens, "cache_hit": ctx.cache_hit,
               "tiles_read": ctx.tiles_read},
        generation={"prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
                    "stop_reason": stats.stop_reason, "kv_cache_bytes": stats.kv_cache_bytes,
                    "decoder": pipe.decoder_component, "batch_rows": batch_rows,
                    "decoded_with": stats.batch_peak, "params": params.__dict__},
    )
