"""Tokenizer and chat template. Torch-free: the runtime formats prompts exactly as training did, and a checkpoint
that carries another model's template (an imported Qwen2.5 folder's) is rendered by the same `ChatTemplate` in
PyTorch and in the runtime."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError, LocpathError

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)

# Qwen-style ChatML, as a Jinja template for Hugging Face tools; `format_prompt` is its exact equivalent.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def format_prompt(question: str) -> str:
    """One user turn and the assistant's opening, as CHAT_TEMPLATE renders it."""
    return f"{IM_START}user\n{question.strip()}{IM_END}\n{IM_START}assistant\n"


def train_tokenizer(lines: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (as Qwen/GPT-2), so any text round-trips and streams byte-exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # templates wrap questions; include them so the newlines and role words get merged too
    tok.train_from_iterator([format_prompt(x) + x + IM_END for x in lines] * 4, trainer=trainer)
    return tok


def load_tokenizer(path: str | os.PathLike):
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.exists():
        raise CheckpointError(f"{p}: tokenizer.json not found")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as exc:
        raise CheckpointError(f"{p}: not a valid tokenizer file ({exc})") from exc
    for s in SPECIAL_TOKENS:
        if tok.token_to_id(s) is None:
            raise CheckpointError(f"{p}: tokenizer lacks the special token {s}")
    return tok


class ChatTemplate:
    """A Hugging Face chat template (Jinja), rendered in a sandbox as Hugging Face renders chat templates
    (trim_blocks, lstrip_blocks), so a model from any family formats its prompts the way its LLM was trained; a
    template that does not render is refused when it is loaded."""

    def __init__(self, text: str, where: str, special: dict | None = None):
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:  # pragma: no cover - jinja2 is a runtime dependency
            raise LocpathError("chat templates need jinja2 (pip install jinja2)") from exc
        self.text = text
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
    def from_file(cls, path: str | os.PathLike, special: dict | None = None) -> "ChatTemplate":
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
