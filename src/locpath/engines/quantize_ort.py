"""ONNX Runtime quantization recipes (explicit, in the graph; never implicit calibrators).

- Tile encoder INT8, dynamic: MatMul/Gemm weights int8 per channel, activations quantized at run time (U8S8,
  the fast form on VNNI/AMX CPUs). LayerNorm, Softmax and residual adds stay float.
- Tile encoder INT8, static QDQ: the same ops with activation ranges calibrated (MinMax) on tissue tiles.
- Decoder INT4: weight-only MatMulNBits (block 32, symmetric, accuracy level 4 = int8 compute on CPU). A tied
  lm_head appears as MatMul(x, Transpose(embedding)) and escapes the quantizer; the transpose is folded into an
  initializer of its own first, so the lm_head is quantized too.
- FP16 (for GPUs): float16 weights and compute, float32 inputs/outputs kept; RMSNorm's statistics (x^2, its mean,
  rsqrt and the scaling by it) stay float32, because real LLM activations reach the thousands and x^2 overflows
  float16; the converted graph is topologically sorted again (the converter appends its Casts at the end).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _ort_transformers_path() -> None:
    """ONNX Runtime's quantization and transformers tools import siblings by bare name (`from fusion_utils import`),
    relying on the folder that `onnxruntime.transformers`' __init__ appends to sys.path once, at its first import.
    Whatever restores sys.path afterwards (pytest's monkeypatch, a host application) breaks every later import of
    them; put the folder back before using them."""
    import sys

    import onnxruntime.transformers as ortt

    folder = os.path.dirname(ortt.__file__)
    if folder not in sys.path:
        sys.path.append(folder)


def fold_transposed_initializers(model) -> int:
    """Replace Transpose(initializer) feeding MatMul's B input by a transposed initializer. Returns the count."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    folded = 0
    for n in list(g.node):
        if n.op_type != "Transpose" or n.input[0] not in inits:
            continue
        perm = [a.ints for a in n.attribute if a.name == "perm"]
        w = numpy_helper.to_array(inits[n.input[0]])
        if w.ndim != 2 or (perm and list(perm[0]) != [1, 0]):
            continue
        users = consumers.get(n.output[0], [])
        if not users or any(u.op_type != "MatMul" or u.input[1] != n.output[0] for u in users):
            continue
        name = f"{n.input[0]}.transposed"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
        for u in users:
            u.input[1] = name
        g.node.remove(n)
        folded += 1
    return folded


def encoder_int8_dynamic(src: Path, dst: Path) -> dict:
    _ort_transformers_path()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                     weight_type=QuantType.QInt8)
    return {"method": "dynamic", "weights": "int8 per-channel", "activations": "uint8 at run time",
            "ops": ["MatMul", "Gemm"]}


class _TileFeed:
    """CalibrationDataReader over uint8 tiles, in batches."""

    def __init__(self, tiles: np.ndarray, batch: int = 16):
        self.batches = [tiles[i : i + batch] for i in range(0, len(tiles), batch)]

    def get_next(self):
        return {"tiles": self.batches.pop(0)} if self.batches else None

    def rewind(self):  # pragma: no cover - not used by MinMax
        pass


def encoder_int8_static(src: Path, dst: Path, tiles: np.ndarray) -> dict:
    _ort_transformers_path()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(dst), _TileFeed(tiles), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return {"method": "static QDQ", "weights": "int8 per-channel", "activations": "uint8 (MinMax calibrated)",
            "ops": ["MatMul", "Gemm"], "calibration_tiles": int(len(tiles))}


def decoder_int4(src: Path, dst: Path, block_size: int = 32) -> dict:
    import onnx
    _ort_transformers_path()
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    folded = fold_transposed_initializers(model)
    q = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, accuracy_level=4)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
    out = onnx.load(str(dst))
    n4 = sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")
    left = sum(1 for n in out.graph.node if n.op_type == "MatMul"
               and n.input[1] in {i.name for i in out.graph.initializer})
    return {"method": "weight-only MatMulNBits", "bits": 4, "block_size": block_size, "symmetric": True,
            "accuracy_level": 4, "folded_transposes": folded, "matmul_nbits": n4, "float_matmuls_with_weights": left}


RMSNORM_CHAIN = ("Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul")


def rmsnorm_statistics_nodes(model) -> list[str]:
    """Names of the nodes of every RMSNorm's x^2 -> mean -> +eps -> sqrt -> 1/. -> x * rsqrt chain."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    names = []
    for n in model.graph.node:
        if n.op_type != "Pow":
            continue
        chain, cur = [n], n
        for op in RMSNORM_CHAIN[1:]:
            nxt = [c for c in consumers.get(cur.output[0], []) if c.op_type == op]
            if len(nxt) != 1:
                break
            chain.append(nxt[0])
            cur = nxt[0]
        if len(chain) == len(RMSNORM_CHAIN):
            names += [c.name for c in chain]
    return names


def to_fp16(src: Path, dst: Path) -> dict:
    import onnx
    _ort_transformers_path()
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    keep = rmsnorm_statistics_nodes(model)
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    om = OnnxModel(model)
    om.topological_sort()
    onnx.checker.check_model(om.model)
    onnx.save(om.model, str(dst))
    return {"method": "float16 weights and compute", "io": "float32 kept",
            "float32_nodes": len(keep), "float32_why": "RMSNorm statistics (x^2 overflows float16)"}


def file_size(p: str | os.PathLike) -> int:
    return Path(p).stat().st_size
