"""The fused decoder's weights straight from a Hugging Face folder's safetensors shards (+ a LoRA adapter), read
lazily, so `build_fused_decoder(..., external=True)` writes a 7B INT4 decoder holding one weight matrix at a time.

`HFFusedWeights` is the lazy counterpart of `export/fused.py`'s dict: the same names and layouts (MatMul weights
as [in, out] through `__getitem__`, or as their stored [out, in] rows through `rows`, which is what the INT4
quantizer reads), with q/k/v and gate/up packed, LoRA merged per weight, and the CARA blocks' weights (small,
from the LoC-Path checkpoint) passed in already in the graph's layout.
"""

from __future__ import annotations

import importlib

import numpy as np

from ..errors import LocpathError
from .fused_graph import FusedDecoderSpec
from .hf_weights import HFFolder, LoraAdapter  # HFFolder or any object with its attributes


def rope_caches(hf: HFFolder, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [max_positions, head_dim/2] from the model family's own rotary embedding class (its inverse
    frequencies and scaling, built from config.json alone: no weights), as export/fused.py takes them."""
    cfg = hf.hf_config()
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3", "yarn"):
        raise LocpathError(f"{hf.folder}: rope type {rope.get('rope_type')!r} is not supported by the fused decoder")
    mod = importlib.import_module(f"transformers.models.{hf.model_type}.modeling_{hf.model_type}")
    cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding"))
    rot = cls(config=cfg)
    inv = rot.inv_freq.double().cpu().numpy()
    scale = float(getattr(rot, "attention_scaling", 1.0))
    freqs = np.arange(max_positions, dtype=np.float64)[:, None] * inv[None, :]
    return (np.cos(freqs) * scale).astype(np.float32), (np.sin(freqs) * scale).astype(np.float32)


def spec_from_hf(hf: HFFolder, max_positions: int, cara_layers=(), cara_heads: int = 0, cara_ffn: int = 0,
                 cara_eps: float = 1e-6) -> FusedDecoderSpec:
    c, w = hf.config, hf.weights
    if c.get("hidden_act", "silu") != "silu" or c.get("mlp_bias", False):
        raise LocpathError(f"{hf.folder}: the fused decoder expects a SwiGLU MLP without bias (Qwen2/Llama)")
    if c.get("use_sliding_window", False) and c.get("sliding_window"):
        raise LocpathError(f"{hf.folder}: sliding-window attention is not supported by the fused decoder")
    try:
        heads, hidden = int(c["num_attention_heads"]), int(c["hidden_size"])
        spec = FusedDecoderSpec(
            num_layers=int(c["num_hidden_layers"]), hidden=hidden, num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads", heads)),
            head_dim=int(c.get("head_dim") or hidden // heads), intermediate=int(c["intermediate_size"]),
            vocab=int(c["vocab_size"]), rms_eps=float(c.get("rms_norm_eps", 1e-6)), max_positions=int(max_positions),
            tied_embeddings=bool(c.get("tie_word_embeddings", False)) and "lm_head.weight" not in w,
            qkv_bias="model.layers.0.self_attn.q_proj.bias" in w,
            cara_layers=list(cara_layers), cara_heads=cara_heads, cara_ffn=cara_ffn, cara_eps=cara_eps)
    except (KeyError, TypeError, ValueError) as exc:
        raise LocpathError(f"{hf.folder}/config.json: missing or malformed size ({exc})") from None
    if "model.layers.0.self_attn.o_proj.bias" in w:
        raise LocpathError(f"{hf.folder}: the fused decoder expects an o_proj without bias")
    return spec


class _Rows:
    """Rows of a stored [N, K] tensor converted to float32 slice by slice (the vocabulary matrices)."""

    def __init__(self, hf: HFFolder, name: str):
        self.hf, self.name = hf, name
        self.shape = hf.weights.shape(name)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.hf.weights.array(self.name, rows)

    def __array__(self, dtype=None, copy=None):
        a = self.hf.weights.array(self.name)
        return a if dtype is None else a.astype(dtype)


class HFFusedWeights:
    """Lazy fused-layout weights over a HF folder; see the module docstring."""

    def __init__(self, hf: HFFolder, spec: FusedDecoderSpec, lora: LoraAdapter | None = None,
                 cara: dict[str, np.ndarray] | None = None):
        self.hf, self.spec, self.lora, self.cara = hf, spec, lora, dict(cara or {})
        if lora is not None:
            lora.check_against(hf)
            unused = sorted(k for k in lora.pairs if not self._adapted(k))
            if unused:
                raise LocpathError(f"{lora.source}: adapts {unused[0]}, which the fused decoder does not use "
                                   f"({len(unused)} such weights)")
        self._want = spec.expected_weights()
        self._rope = None
        missing = [k for k in self._want if not self._present(k)]
        if missing:
            raise LocpathError(f"{hf.folder}: weights missing for {', '.join(missing[:4])}"
                               + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))

    # -- which HF tensors make each fused weight ----------------------------------------------------------
    def _sources(self, name: str) -> list[str] | None:
        if name == "embed":
            return ["model.embed_tokens.weight"]
        if name == "lm_head":
            return ["lm_head.weight"]
        if name == "norm":
            return ["model.norm.weight"]
        if name.startswith("layers."):
            _, j, rest = name.split(".", 2)
            p = f"model.layers.{j}."
            return {"ln1": [p + "input_layernorm.weight"], "ln2": [p + "post_attention_layernorm.weight"],
                    "qkv.weight": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
                    "qkv.bias": [p + f"self_attn.{x}_proj.bias" for x in "qkv"],
                    "o.weight": [p + "self_attn.o_proj.weight"],
                    "gate_up.weight": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                    "down.weight": [p + "mlp.down_proj.weight"]}.get(rest)
        return None

    def _adapted(self, hf_name: str) -> bool:
        return any(hf_name in (self._sources(k) or []) for k in self.spec.expected_weights())

    def _present(self, name: str) -> bool:
        if name.startswith("rope."):
            return True
        if name.startswith("cara."):
            return name in self.cara
        src = self._sources(name)
        return bool(src) and all(s in self.hf.weights for s in src)

    # -- the mapping the graph builder reads ------------------------------------------------------------
    def __iter__(self):
        return iter(self._want)

    def __contains__(self, name) -> bool:
        return name in self._want and self._present(name)

    def shape_of(self, name: str) -> tuple:
        if name.startswith(("rope.", "cara.")):
            return tuple(np.shape(self[name]))
        shapes = [self.hf.weights.shape(s) for s in self._sources(name)]
        if len(shapes[0]) == 1:
            return (sum(s[0] for s in shapes),)
        if name in ("embed", "lm_head"):
            return shapes[0]
        return (shapes[0][1], sum(s[0] for s in shapes))  # [in, out]

    def _merged(self, src: str) -> np.ndarray:
        w = self.hf.weights.array(src)
        if self.lora is not None:
            d = self.lora.delta(src)
            if d is not None:
                w += d
        return w

    def rows(self, name: str):
        """[out, in] float32 (LoRA merged); the vocabulary matrices as a lazy row source."""
        src = self._sources(name)
        if src is None:
            return np.ascontiguousarray(np.asarray(self[name], np.float32).T)
        if name in ("embed", "lm_head") and (self.lora is None or self.lora.delta(src[0]) is None):
            return _Rows(self.hf, src[0])
        parts = [self._merged(s) for s in src]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, name: str) -> np.ndarray:
        if name.startswith("rope."):
            if self._rope is None:
                self._rope = rope_caches(self.hf, self.spec.max_positions)
            return self._rope[0] if name == "rope.cos_cache" else self._rope[1]
        if name.startswith("cara."):
            return np.asarray(self.cara[name], np.float32)
        src = self._sources(name)
        if src is None:
            raise KeyError(name)
        if len(self.hf.weights.shape(src[0])) == 1:
            return np.concatenate([self._merged(s) for s in src])
        r = self.rows(name)
        return np.asarray(r) if name in ("embed", "lm_head") else np.ascontiguousarray(r.T)
