"""Streaming detokenisation that never emits a broken character.

Byte-level BPE tokens can split one UTF-8 character across tokens. Text is decoded from the first
not-yet-emitted token each time; a decoded tail ending in U+FFFD (an incomplete sequence) is held back
until the next token completes it.
"""

from __future__ import annotations


class StreamingDetokenizer:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of the full decode already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        out = text[self.emitted :]
        self.emitted = len(text)
        return out

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)
