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

import time
import uuid

from ..errors import LocpathError

SLIDE_URL = "slide:"


class ChatRequestError(LocpathError):
    """A chat request locpath cannot answer (no slide, no question, an unsupported option)."""


def parse_chat(body: dict) -> tuple[str, str, dict]:
    """(slide id, question, sampling overrides) from a chat-completions body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatRequestError("messages must be a non-empty list")
    slide_id = body.get("slide_id")
    question = None
    for m in messages:
        if not isinstance(m, dict):
            raise ChatRequestError("each message must be an object")
        content = m.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        texts = []
        for p in parts:
            if not isinstance(p, dict):
                raise ChatRequestError("each content part must be an object")
            kind = p.get("type")
            if kind == "text" and isinstance(p.get("text"), str):
                texts.append(p["text"])
            elif kind == "image_url":
                url = (p.get("image_url") or {}).get("url", "") if isinstance(p.get("image_url"), dict) else ""
                if not url.startswith(SLIDE_URL):
                    raise ChatRequestError("image parts must reference a registered slide as 'slide:<id>'")
                slide_id = url[len(SLIDE_URL):]
            elif kind == "slide" and isinstance(p.get("slide_id"), str):
                slide_id = p["slide_id"]
            elif p.get("text") is None and kind == "text":
                continue
            else:
                raise ChatRequestError(f"unsupported content part type {kind!r}")
        if m.get("role") == "user" and texts:
            question = " ".join(t.strip() for t in texts if t.strip())
    if not slide_id or not isinstance(slide_id, str):
        raise ChatRequestError("no slide referenced: add a content part {'type': 'image_url', 'image_url': "
                               "{'url': 'slide:<id>'}} or a top-level 'slide_id'")
    if not question:
        raise ChatRequestError("no user question in the messages")
    sampling = {}
    if body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None:
        sampling["max_new_tokens"] = body.get("max_completion_tokens") or body.get("max_tokens")
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            raise ChatRequestError("temperature must be a number")
        if temperature > 0:  # OpenAI's temperature 0 means greedy, which is locpath's default
            sampling.update(do_sample=True, temperature=float(temperature))
    if body.get("top_p") is not None:
        sampling["top_p"] = body["top_p"]
    if body.get("seed") is not None:
        sampling["seed"] = body["seed"]
    if body.get("n") not in (None, 1):
        raise ChatRequestError("n must be 1")
    return slide_id, question, sampling


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
            "locpath": {"timings_ms": answer.timings_ms, "slide": answer.slide,
                        "evidence": answer.evidence.to_dict() if answer.evidence is not None else None}}


def chunk(cid: str, model: str, created: int, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
