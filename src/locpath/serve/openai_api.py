"""The OpenAI chat-completions shape over locpath: a request names a registered slide and asks a question; the answer
comes back as a `chat.completion`, or with `stream: true` as `chat.completion.chunk` server-sent events ending in
`data: [DONE]`, so the official `openai` client works unchanged.

A slide is referenced by a message content part, in any of these forms (the first works with every OpenAI client,
since it is the standard image part with a `slide:` URL):
    {"type": "image_url", "image_url": {"url": "slide:<slide id>"}}
    {"type": "slide", "slide_id": "<slide id>"}
or by a top-level `"slide_id"` in the request body (the client's `extra_body`). The question is the text of the
last user message (locpath's models answer one question at a time; earlier turns are not fed back).
"""

from __future__ import annotations

import math
import time
import uuid

from ..errors import LocpathError

SLIDE_URL = "slide:"


class ChatRequestError(LocpathError):
    """A chat request locpath cannot answer (no slide, no question, an unsupported option)."""


def parse_chat(body: dict) -> tuple[str, str, dict, bool]:
    """(slide id, question, sampling overrides, stream) from a chat-completions body; every field is type-checked
    here (a wrong type is a 400 naming the field, never a traceback or a silent default)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatRequestError("messages must be a non-empty list")
    slides = set()
    if body.get("slide_id") is not None:
        slides.add(_slide_id(body["slide_id"], "slide_id"))
    question = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatRequestError(f"messages[{i}] must be an object with a string 'role'")
        texts = _parts(m.get("content"), f"messages[{i}].content", slides)
        if m["role"] == "user" and texts:
            question = " ".join(t.strip() for t in texts if t.strip())
    if len(slides) > 1:
        raise ChatRequestError(f"one slide per request, got {len(slides)}: {', '.join(sorted(slides))[:200]}")
    if not slides:
        raise ChatRequestError("no slide referenced: add a content part {'type': 'image_url', 'image_url': "
                               "{'url': 'slide:<id>'}} or a top-level 'slide_id'")
    if not question:
        raise ChatRequestError("no user question in the messages")
    return slides.pop(), question, _sampling(body), _flag(body, "stream")


def _slide_id(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ChatRequestError(f"{where} must be a slide id (text)")
    return value


def _parts(content, where: str, slides: set) -> list[str]:
    """The texts of a message's content (text, null or a list of parts); slide references go into `slides`."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise ChatRequestError(f"{where} must be text or a list of content parts")
    texts = []
    for j, p in enumerate(content):
        here = f"{where}[{j}]"
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            if not isinstance(p.get("text"), str):
                raise ChatRequestError(f"{here}.text must be text")
            texts.append(p["text"])
        elif kind == "image_url":
            image = p.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str) or not url.startswith(SLIDE_URL):
                raise ChatRequestError(f"{here}: image parts must reference a registered slide as "
                                       "{'image_url': {'url': 'slide:<id>'}}")
            slides.add(_slide_id(url[len(SLIDE_URL):], f"{here}.image_url.url"))
        elif kind == "slide":
            slides.add(_slide_id(p.get("slide_id"), f"{here}.slide_id"))
        elif isinstance(p, dict):
            raise ChatRequestError(f"{here}: unsupported content part type {str(kind)[:40]!r}")
        else:
            raise ChatRequestError(f"{here} must be an object with a 'type'")
    return texts


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ChatRequestError(f"{name} must be true or false")
    return bool(value)


def _integer(body: dict, name: str, lo: int, hi: int = 2**63 - 1) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi):
        raise ChatRequestError(f"{name} must be an integer from {lo} to {hi}")
    return value


def _number(body: dict, name: str, lo: float, hi: float, lo_open: bool) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < lo or (lo_open and value == lo) or value > hi:
        raise ChatRequestError(f"{name} must be a number {'>' if lo_open else '>='} {lo:g} and <= {hi:g}")
    return float(value)


def _sampling(body: dict) -> dict:
    """OpenAI's sampling fields as locpath's overrides (the native route's bounds)."""
    sampling = {}
    if body.get("n") is not None and _integer(body, "n", 1, 1) != 1:
        raise ChatRequestError("n must be 1")
    tokens = _integer(body, "max_completion_tokens", 1), _integer(body, "max_tokens", 1)
    if tokens[0] is not None or tokens[1] is not None:
        sampling["max_new_tokens"] = tokens[0] if tokens[0] is not None else tokens[1]
    temperature = _number(body, "temperature", 0.0, 100.0, lo_open=False)
    if temperature:  # OpenAI's temperature 0 means greedy, which is locpath's default
        sampling.update(do_sample=True, temperature=temperature)
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    if top_p is not None:
        sampling["top_p"] = top_p
    seed = _integer(body, "seed", 0)
    if seed is not None:
        sampling["seed"] = seed
    abstain = _number(body, "abstain_below", 0.0, 1.0, lo_open=False)  # locpath's extension field
    if abstain is not None:
        sampling["abstain_below"] = abstain
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or len(model) > 256):
        raise ChatRequestError("model must be text (at most 256 characters)")
    return sampling


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def finish_reason(stop_reason: str) -> str:
    return "length" if stop_reason == "max_new_tokens" else "stop"


def completion(cid: str, model: str, answer) -> dict:
    g = answer.generation
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.answer},
                         "finish_reason": finish_reason(g["stop_reason"])}],
            "usage": {"prompt_tokens": g["prompt_tokens"], "completion_tokens": g["new_tokens"],
                      "total_tokens": g["prompt_tokens"] + g["new_tokens"]},
            "locpath": {"timings_ms": answer.timings_ms, "slide": answer.slide, "trust": answer.trust,
                        "evidence": answer.evidence.to_dict() if answer.evidence is not None else None}}


def chunk(cid: str, model: str, created: int, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
