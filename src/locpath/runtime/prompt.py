"""Prompts from the bundle's own chat template (the Jinja file its manifest names and checksums), rendered in a
sandbox as Hugging Face renders chat templates, so a bundle from any model family formats its prompts the way
its LLM was trained; a template that does not render is refused when the bundle loads."""

from __future__ import annotations

from pathlib import Path

from ..errors import LocpathError


class ChatTemplate:
    def __init__(self, text: str, where: str, special: dict | None = None):
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:  # pragma: no cover - jinja2 is a runtime dependency
            raise LocpathError("chat templates need jinja2 (pip install jinja2)") from exc
        self.where = where
        self.special = dict(special or {})
        self._error = TemplateError
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            self._template = env.from_string(text)
            self.render("?")  # a template that cannot render fails at load, not at the first question
        except TemplateError as exc:
            raise LocpathError(f"{where}: chat template does not render ({exc})") from None

    @classmethod
    def from_file(cls, path: str | Path, special: dict | None = None) -> "ChatTemplate":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LocpathError(f"{p}: cannot read the chat template ({exc})") from None
        return cls(text, str(p), special)

    def render(self, question: str) -> str:
        """One user turn and the opening of the assistant's answer."""
        try:
            return self._template.render(messages=[{"role": "user", "content": question.strip()}],
                                         add_generation_prompt=True, **self.special)
        except self._error as exc:
            raise LocpathError(f"{self.where}: chat template failed to render ({exc})") from None
