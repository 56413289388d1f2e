"""Build a Hugging Face decoder-only LLM (Qwen2 or Llama) from LLMConfig, or load one from a local folder."""

from __future__ import annotations

from pathlib import Path

from ..config import LLMConfig
from ..errors import CheckpointError


def hf_config(cfg: LLMConfig):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    if cfg.architecture == "qwen2":
        return Qwen2Config(**common)
    if cfg.architecture == "llama":
        return LlamaConfig(**common)
    raise CheckpointError(f"unsupported LLM architecture {cfg.architecture!r} (qwen2 or llama)")


def build_llm(cfg: LLMConfig):
    """A randomly initialised LLM from the config, or the local pretrained folder it names (never a hub)."""
    from transformers import AutoModelForCausalLM

    if cfg.pretrained_path:
        p = Path(cfg.pretrained_path)
        if not (p / "config.json").exists():
            raise CheckpointError(f"{p}: not a Hugging Face model folder (no config.json)")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype="float32")
        except Exception as exc:
            raise CheckpointError(f"{p}: cannot load the LLM ({exc})") from exc
    else:
        model = AutoModelForCausalLM.from_config(hf_config(cfg))
    if model.config.model_type not in ("qwen2", "llama"):
        raise CheckpointError(f"LLM type {model.config.model_type!r} is not supported (qwen2 or llama)")
    return model


def sync_llm_config(cfg: LLMConfig, model) -> LLMConfig:
    """The sizes of a loaded model, written back into our config (what a bundle records)."""
    c = model.config
    rope = getattr(c, "rope_parameters", None) or {}
    return LLMConfig(
        architecture=c.model_type,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", c.num_attention_heads),
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        pretrained_path=None,
    )


def decoder_layers(model):
    """The ModuleList of decoder layers of a Qwen2/Llama CausalLM."""
    return model.model.layers
