"""The decoder's I/O contract, declared once: tensor names, dtypes and symbolic shapes of the two decoder graphs,
and the manifest templates the runtime reads back. The plain export (export/configs.py), the fused graph writer
(engines/fused_graph.py), the TensorRT profiles and the runtime's decoder states all take their names from here.

- plain (`decoder`, the dynamo export): input_ids, attention_mask [batch, total], position_ids, past K/V of
  length `past` per layer, cross K/V of each CARA layer -> logits [batch, sequence, vocab], present K/V of
  length `total` = past + sequence.
- fused (`decoder_fused`, ONNX Runtime contrib ops): input_ids, attention_mask, past K/V buffers of length
  `max_length` bound as past *and* present (GroupQueryAttention writes the new positions in place), cross K/V
  -> logits of the last position [batch, 1, vocab] (float32). Its K/V are float16 in the build for CUDA
  (`kv_dtype`), float32 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LocpathError

KINDS = ("plain", "fused")
KV_DTYPES = ("float32", "float16")


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key.{layer}", f"past_value.{layer}"


def present_names(layer: int) -> tuple[str, str]:
    return f"present_key.{layer}", f"present_value.{layer}"


def cross_names(layer: int) -> tuple[str, str]:
    return f"cross_key.{layer}", f"cross_value.{layer}"


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dtype: str
    shape: tuple  # ints or symbolic axis names

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class DecoderContract:
    kind: str  # "plain" or "fused"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    cara_layers: tuple[int, ...]
    cara_heads: int
    cara_head_dim: int
    max_positions: int = 0  # fused: the K/V buffers' capacity (rows of its rotary caches); plain: 0 (unbounded)
    kv_dtype: str = "float32"  # self and cross K/V ("float16" for the fused graph built for CUDA)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LocpathError(f"decoder kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "vocab"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LocpathError(f"decoder {name} must be a positive integer, got {v!r}")
        if not all(isinstance(i, int) and 0 <= i < self.num_layers for i in self.cara_layers):
            raise LocpathError(f"decoder cara_layers {list(self.cara_layers)} must be layer indices below {self.num_layers}")
        if self.cara_layers and (self.cara_heads < 1 or self.cara_head_dim < 1):
            raise LocpathError("decoder with CARA layers needs positive cara_heads and cara_head_dim")
        if self.kind == "fused" and self.max_positions < 2:
            raise LocpathError(f"fused decoder max_positions must be >= 2, got {self.max_positions!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise LocpathError(f"decoder kv_dtype must be one of {', '.join(KV_DTYPES)}, not {self.kv_dtype!r}")

    # -- names ---------------------------------------------------------------------------------
    def past(self, layer: int) -> tuple[str, str]:
        return past_names(layer)

    def present(self, layer: int) -> tuple[str, str]:
        return present_names(layer)

    def cross(self, layer: int) -> tuple[str, str]:
        return cross_names(layer)

    def cross_outputs(self) -> list[TensorDecl]:
        """What the cross-KV graph produces and the decoder consumes, once per question."""
        shape = ("batch", self.cara_heads, "selected", self.cara_head_dim)
        return [TensorDecl(n, self.kv_dtype, shape) for i in self.cara_layers for n in self.cross(i)]

    # -- graph I/O ------------------------------------------------------------------------------
    def inputs(self) -> list[TensorDecl]:
        kv_len = "past" if self.kind == "plain" else "max_length"
        out = [TensorDecl("input_ids", "int64", ("batch", "sequence")),
               TensorDecl("attention_mask", "int64", ("batch", "total"))]
        if self.kind == "plain":
            out.append(TensorDecl("position_ids", "int64", ("batch", "sequence")))
        kv = ("batch", self.num_kv_heads, kv_len, self.head_dim)
        for j in range(self.num_layers):
            out += [TensorDecl(n, self.kv_dtype, kv) for n in self.past(j)]
        return out + self.cross_outputs()

    def outputs(self) -> list[TensorDecl]:
        if self.kind == "plain":
            out = [TensorDecl("logits", "float32", ("batch", "sequence", self.vocab))]
            kv = ("batch", self.num_kv_heads, "total", self.head_dim)
        else:
            out = [TensorDecl("logits", "float32", ("batch", 1, self.vocab))]
            kv = ("batch", self.num_kv_heads, "max_length", self.head_dim)
        for j in range(self.num_layers):
            out += [TensorDecl(n, self.kv_dtype, kv) for n in self.present(j)]
        return out

    # -- manifest --------------------------------------------------------------------------------
    def to_templates(self) -> dict:
        return {"contract": "locpath-decoder/1", "kind": self.kind, "num_layers": self.num_layers,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "vocab": self.vocab,
                "cara_layers": list(self.cara_layers), "cara_heads": self.cara_heads,
                "cara_head_dim": self.cara_head_dim, "max_positions": self.max_positions, "kv_dtype": self.kv_dtype,
                "past_key": "past_key.{layer}", "past_value": "past_value.{layer}",
                "present_key": "present_key.{layer}", "present_value": "present_value.{layer}",
                "cross_key": "cross_key.{layer}", "cross_value": "cross_value.{layer}"}

    @classmethod
    def from_templates(cls, t: dict, where: str = "decoder") -> "DecoderContract":
        if not isinstance(t, dict) or t.get("contract") != "locpath-decoder/1":
            raise LocpathError(f"{where}: templates do not declare the locpath-decoder/1 contract; re-export the bundle")
        try:
            return cls(kind=t["kind"], num_layers=t["num_layers"], num_kv_heads=t["num_kv_heads"],
                       head_dim=t["head_dim"], vocab=t["vocab"], cara_layers=tuple(t["cara_layers"]),
                       cara_heads=t["cara_heads"], cara_head_dim=t["cara_head_dim"],
                       max_positions=t.get("max_positions", 0), kv_dtype=t.get("kv_dtype", "float32"))
        except (KeyError, TypeError) as exc:
            raise LocpathError(f"{where}: malformed decoder templates ({type(exc).__name__}: {exc})") from None
        except LocpathError as exc:
            raise LocpathError(f"{where}: {exc}") from None
