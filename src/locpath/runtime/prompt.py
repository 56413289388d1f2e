"""Prompts from the bundle's own chat template (the Jinja file its manifest names and checksums), rendered in a
sandbox as Hugging Face renders chat templates, so a bundle from any model family formats its prompts the way
its LLM was trained; a template that does not render is refused when the bundle loads. The class lives in
`locpath.text`, so the PyTorch model of a checkpoint renders the very same template the same way."""

from __future__ import annotations

from ..text import ChatTemplate

__all__ = ["ChatTemplate"]
