"""A question checked once: its text, the decoder's prompt ids (chat template), the TIS graph's ids and the sampling
options, made by `Pipeline.question` before anything runs (not text, empty, too long for the KV cache: one
LocpathError), then taken as is by every path that answers it (`answer`, `stream`, `ask`, `AnswerBatch.add`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LocpathError
from .sampler import SamplingParams

MAX_QUESTION_CHARS = 8192


@dataclass(frozen=True)
class Question:
    text: str
    prompt_ids: tuple[int, ...]  # the question through the bundle's chat template: what the decoder prefills
    tis_ids: tuple[int, ...]  # the question alone: what the TIS graph scores the latents with
    params: SamplingParams
    abstain_below: float | None = None  # answer "uncertain" when the confidence is below this (runtime/trust.py)


def make_question(text, params: SamplingParams, prompt_ids: Callable[[str], list[int]],
                  tis_ids: Callable[[str], list[int]], max_length: int) -> Question:
    """`text` as a Question, or a LocpathError: not text, empty, too long, or its prompt plus `max_new_tokens` do
    not fit in the decoder's `max_length` positions."""
    if not isinstance(text, str):
        raise LocpathError(f"a question must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise LocpathError("the question is not valid UTF-8 text") from None
    if not text.strip():
        raise LocpathError("the question is empty")
    if len(text) > MAX_QUESTION_CHARS:
        raise LocpathError(f"the question is {len(text)} characters long; at most {MAX_QUESTION_CHARS}")
    prompt = prompt_ids(text)
    room = max_length - len(prompt)
    if room < 1:
        raise LocpathError(f"the question's prompt is {len(prompt)} tokens; the decoder holds {max_length} "
                           "positions in all: shorten the question")
    if params.max_new_tokens > room:
        raise LocpathError(f"max_new_tokens {params.max_new_tokens} does not fit: the prompt takes {len(prompt)} of "
                           f"the decoder's {max_length} positions, so at most {room} new tokens")
    tis = tis_ids(text)
    if not tis:
        raise LocpathError("the question is empty")
    return Question(text, tuple(prompt), tuple(tis), params)
