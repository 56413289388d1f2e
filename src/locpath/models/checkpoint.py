"""Checkpoint folders: config.json, model.safetensors, tokenizer.json, chat_template.jinja, train.json.

tokenizer.json and chat_template.jinja are the model's own: locpath's tiny tokenizer and ChatML for a model trained
here, an imported LLM folder's tokenizer and chat template for `locpath import` (import.json then records where
everything came from). `load_checkpoint` sets the model's `chat_template`, so PyTorch prompts as the runtime does.

Written to a temporary folder and renamed into place, so an interrupted save never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import ModelConfig
from ..errors import CheckpointError
from ..fsutil import atomic_dir
from ..text import CHAT_TEMPLATE, ChatTemplate, load_tokenizer

FORMAT_VERSION = 1


def save_checkpoint(model, tokenizer, out: str | os.PathLike, train_info: dict | None = None,
                    chat_template: str | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """`chat_template`: the Jinja text the checkpoint carries (default: locpath's ChatML); `extra_files`: more JSON
    or text files written beside (name -> text), e.g. import.json."""
    from safetensors.torch import save_model

    from .llm import sync_llm_config

    out = Path(out)
    # a checkpoint is self-contained: an LLM loaded from a local folder is recorded by its sizes
    model.cfg.llm = sync_llm_config(model.cfg.llm, model.llm)
    with atomic_dir(out) as tmp:
        cfg = model.cfg.to_dict()
        (tmp / "config.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "model": cfg}, indent=2))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE if chat_template is None else chat_template,
                                                 encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if train_info is not None:
            (tmp / "train.json").write_text(json.dumps(train_info, indent=2))
    return out


def read_config(path: str | os.PathLike) -> ModelConfig:
    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{p}: not a locpath checkpoint (no config.json)")
    try:
        data = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({exc})") from exc
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: unsupported checkpoint format {data.get('format_version')!r}")
    return ModelConfig.from_dict(data["model"])


def load_checkpoint(path: str | os.PathLike):
    """(model in eval mode, tokenizer) from a checkpoint folder."""
    from safetensors.torch import load_model

    from .slide_llm import build_model

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: checkpoint folder not found")
    cfg = read_config(p)
    weights = p / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{p}: model.safetensors missing")
    tok = load_tokenizer(p)
    model = build_model(cfg)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except Exception as exc:
        raise CheckpointError(f"{weights}: cannot load weights ({exc})") from exc
    if missing or unexpected:
        raise CheckpointError(f"{weights}: does not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    template = p / "chat_template.jinja"
    if template.exists():
        model.chat_template = ChatTemplate.from_file(template)
    model.eval()
    return model, tok
