"""The fused decoder's prefill graph: the same graph as `decoder_fused` (same inputs, outputs and K/V layout, so
the runtime runs it on the same K/V buffers), with the layer matmuls in a form that is fast for many tokens.

Why: a prefill of 64 tokens is a matrix-matrix product, where compute rather than weight bytes decides. ONNX
Runtime's INT4 MatMulNBits has no AMX kernel, while MLAS's U8S8 quantized GEMM (what DynamicQuantizeMatMul runs:
activations quantized to uint8 per call, weights int8 per output column) has one. So the prefill graph keeps the
decode graph's INT4 embedding and lm_head (the lm_head sees one position) and writes every layer matmul as
`weights` says:
- `int8`: DynamicQuantizeMatMul over int8 weights with one scale per output column (symmetric);
- `int8-nbits`: MatMulNBits with bits=8 (block-wise scales, ONNX Runtime's 8-bit kernel);
- `int4`: MatMulNBits with bits=4 as the decode graph (a baseline, or another block size / accuracy level).
Torch-free (numpy + onnx), built from the same named weights as the decode graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LocpathError
from .fused_graph import MS, ExternalData, FusedDecoderSpec, _Builder, write_graph

PREFILL_WEIGHTS = ("int8", "int8-nbits", "int4")


@dataclass(frozen=True)
class PrefillRecipe:
    """How the prefill graph's layer matmuls are written. `block_size` applies to the MatMulNBits forms and to the
    INT4 embedding/lm_head shared with the decode graph's layout."""

    weights: str = "int8"
    block_size: int = 32
    accuracy_level: int = 4

    @property
    def name(self) -> str:
        return f"prefill-{self.weights}" + ("" if self.weights == "int8" else f"-b{self.block_size}")

    def check(self) -> None:
        if self.weights not in PREFILL_WEIGHTS:
            raise LocpathError(f"prefill weights must be one of {', '.join(PREFILL_WEIGHTS)}, not {self.weights!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise LocpathError(f"prefill block size must be a power of two >= 16, not {self.block_size}")


def quantize_int8_columns(w_in_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column of a MatMul weight [K, N]: returns (int8 [K, N], scale float32 [N]);
    dequantized: q * scale."""
    w = np.asarray(w_in_out, np.float32)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax == 0, 1.0, amax / 127.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def quantize_int8_blocks(rows: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' 8-bit layout of rows [N, K]: uint8 [N, blocks, block], scales [N*blocks], zero points
    [N*blocks] (all 128: symmetric). Dequantized: (q - 128) * scale."""
    n, k = rows.shape
    nb = -(-k // block)
    padded = np.zeros((n, nb * block), np.float32)
    padded[:, :k] = rows
    blocks = padded.reshape(n, nb, block)
    amax = np.abs(blocks).max(axis=2)
    scale = np.where(amax == 0, 1.0, amax / 127.0).astype(np.float32)
    q = (np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128).astype(np.uint8)
    return q, scale.reshape(-1), np.full(n * nb, 128, np.uint8)


class _PrefillBuilder(_Builder):
    """The decode graph's builder with its layer matmuls replaced; embedding and lm_head stay INT4."""

    def __init__(self, spec: FusedDecoderSpec, weights, recipe: PrefillRecipe, sink: ExternalData | None = None):
        super().__init__(spec, weights, "int4", recipe.block_size, recipe.accuracy_level, sink=sink)
        self.recipe = recipe

    def matmul(self, x: str, wname: str, min_k: int = 16, bias: str | None = None) -> str:
        if self.recipe.weights == "int4":
            return super().matmul(x, wname, min_k, bias)
        rows = self.rows(wname)
        n, k = rows.shape
        name = wname.replace(".weight", "")
        if k < min_k or n <= 1:  # CARA's router: one output column
            return super().matmul(x, wname, min_k, bias)
        self.quantized.append(wname)
        b_in = [self.g.init(bias, self.f(bias))] if bias else []
        if self.recipe.weights == "int8":
            q, scale = quantize_int8_columns(np.asarray(rows, np.float32).T)
            b = self.g.init(wname + ".int8", q)
            sc = self.g.init(wname + ".scale", scale)
            return self.g.node("DynamicQuantizeMatMul", [x, b, sc, *([""] + b_in if bias else [])], domain=MS,
                               name=name)
        q, scale, zp = quantize_int8_blocks(np.asarray(rows, np.float32), self.block)
        b = self.g.init(wname + ".uint8", q)
        sc = self.g.init(wname + ".scales", scale)
        z = self.g.init(wname + ".zp", zp)
        return self.g.node("MatMulNBits", [x, b, sc, z, *([""] + b_in if bias else [])], domain=MS, name=name,
                           K=k, N=n, bits=8, block_size=self.block, accuracy_level=self.acc)


def int8_weight_bytes(spec: FusedDecoderSpec) -> int:
    """About the int8 graph's size: whether it needs external data (protobuf's 2 GB limit)."""
    return spec.weight_bytes("int4", 32) + sum(
        int(np.prod(s)) for k, s in spec.expected_weights().items() if k.endswith(".weight"))


def build_prefill_decoder(spec: FusedDecoderSpec, weights, out: str | os.PathLike, recipe: PrefillRecipe = PrefillRecipe(),
                          source: str = "weights", external: bool | None = None) -> dict:
    """Write the prefill graph to `out` (atomically); returns what was done, as `build_fused_decoder` does."""
    recipe.check()
    spec.check_weights(weights, source)
    if external is None:
        external = int8_weight_bytes(spec) > 1_800_000_000
    b, model, data_name, ops = write_graph(lambda sink: _PrefillBuilder(spec, weights, recipe, sink=sink), out,
                                           external)
    return {"method": "locpath fused prefill graph (decoder_fused's contract; layer matmuls for many tokens)",
            "recipe": recipe.name, "weights": recipe.weights, "block_size": recipe.block_size,
            "accuracy_level": recipe.accuracy_level, "nodes": len(model.graph.node), "ops": ops,
            "quantized_weights": len(b.quantized), "float_matmul_weights": b.float_matmuls, "data_file": data_name}


# -- `locpath build`: add the prefill graph when it measures faster ------------------------------------------
def _greedy(decode: Path, prefill: Path | None, contract, prompt: np.ndarray, new: int, threads: int) -> tuple[list, float]:
    """Greedy tokens after `prompt` (prefill on `prefill` when given, then single steps on `decode`), and the
    prefill's best time of 3 (s). Cross K/V of zeros: the decoder's own text path is what differs."""
    from ..runtime.decoder_state import decoder_state
    from ..runtime.ort_runner import OrtRunner

    pre = OrtRunner(prefill, "decoder_fused_prefill", threads=threads) if prefill else None
    st = decoder_state(OrtRunner(decode, "decoder_fused", threads=threads), contract, pre)
    cross = {n: np.zeros((1, contract.cara_heads, 8, contract.cara_head_dim), np.float32)
             for i in contract.cara_layers for n in contract.cross(i)}
    best, toks = float("inf"), []
    for rep in range(4):
        run = st.greedy(prompt[0].tolist(), cross, new)
        if rep:  # the first call warms up
            best = min(best, run.prefill_s)
        toks = run.tokens
    for r in (st.runner, pre):
        if r is not None:
            r.release()
    return toks, best


def measure_prefill(decode: Path, prefill: Path, contract, prompt_len: int = 64, new: int = 8,
                    threads: int | None = None, seed: int = 0) -> dict:
    """The prefill graph against the decode graph alone on a random prompt: prefill ms of each and whether the
    greedy tokens agree. `faster_and_same` decides whether `locpath build` keeps it."""
    prompt_len = min(prompt_len, max(2, contract.max_positions - new - 1))
    prompt = np.random.default_rng(seed).integers(0, contract.vocab, (1, prompt_len))
    base, t_base = _greedy(decode, None, contract, prompt, new, threads)
    got, t_pre = _greedy(decode, prefill, contract, prompt, new, threads)
    return {"prompt_tokens": prompt_len, "decode_graph_prefill_ms": round(1000 * t_base, 2),
            "prefill_graph_ms": round(1000 * t_pre, 2), "greedy_tokens_agree": got == base,
            "faster_and_same": got == base and t_pre < t_base}
