"""Streaming detokenisation that never emits a broken character: tokenizers' own DecodeStream (it keeps a small
window of pending ids, so each step costs O(1), and holds back a UTF-8 character split across tokens)."""

from __future__ import annotations


class StreamingDetokenizer:
    def __init__(self, tokenizer):
        from tokenizers.decoders import DecodeStream

        self.tok = tokenizer
        self.ids: list[int] = []
        self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """The text this token completes ('' while a character is still incomplete)."""
        self.ids.append(int(token_id))
        return self._stream.step(self.tok, int(token_id)) or ""

    def text(self) -> str:
        """The whole answer, decoded once."""
        return self.tok.decode(self.ids, skip_special_tokens=True)
