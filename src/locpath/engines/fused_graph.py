"""The fused decoder graph, written op by op from named weights (in the manner of onnxruntime-genai's builder).

Why: the dynamo export of a Hugging Face decoder is ~25 small ops per attention (rotary, concat, masks,
repeat-kv), and on a CPU decode step the per-op overhead is the cost. This graph uses ONNX Runtime's contrib
ops instead:
- `GroupQueryAttention` with rotary inside (cos/sin caches from the model's own inverse frequencies) and the
  past/present K/V sharing one preallocated buffer per layer, so a decode step writes one position in place;
- `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization` for RMSNorm (+ residual add);
- CARA cross-attention through `MultiHeadAttention` over the per-question cross K/V (BNSH), gated as in
  `models/cara.py`;
- only the last position's logits (`Gemm` against the [vocab, hidden] weight, so a tied lm_head needs no
  transposed copy);
- with `quant="int4"`: every weight matmul as `MatMulNBits` (block-wise symmetric INT4, accuracy level 4),
  the lm_head included, and the embedding as `GatherBlockQuantized` (over the *same* INT4 tensor as the
  lm_head when the embedding is tied: no float copy of the vocabulary matrix is kept at all).

Torch-free (numpy + onnx): `locpath export` feeds it weights taken from the PyTorch model, and `locpath build`
re-reads those weights from the fp32 fused graph's named initializers to write the INT4 variant.
The graph runs on ONNX Runtime (CPU or CUDA execution providers) and, INT4 with its embedding gather rewritten
(engines/openvino_fused.py), on OpenVINO's CPU plugin; TensorRT uses the plain decoder graph.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..bundle.decoder_io import DecoderContract, cross_names, past_names, present_names
from ..errors import LocpathError

MS = "com.microsoft"


@dataclass
class FusedDecoderSpec:
    """Everything the graph's shape depends on; saved in the manifest's decoder templates."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    max_positions: int  # rows of the cos/sin caches: the longest prompt + answer the graph accepts
    tied_embeddings: bool
    qkv_bias: bool
    cara_layers: list = field(default_factory=list)
    cara_heads: int = 0
    cara_ffn: int = 0
    cara_eps: float = 1e-6
    # an `inputs_embeds` [B, V, hidden] input placed before the embedded input_ids (V may be 0): the prefix
    # baseline's projected tile tokens (bench/headline.py); not a LoC-Path bundle's contract
    embeds_input: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FusedDecoderSpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @classmethod
    def from_templates(cls, templates: dict) -> "FusedDecoderSpec":
        if not isinstance(templates.get("spec"), dict):
            raise LocpathError("fused decoder templates carry no graph spec; re-export the bundle")
        return cls.from_dict(templates["spec"])

    def contract(self, kv_dtype: str = "float32") -> DecoderContract:
        """The graph's I/O as the runtime sees it (bundle/decoder_io.py)."""
        return DecoderContract(kind="fused", num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                               head_dim=self.head_dim, vocab=self.vocab, cara_layers=tuple(self.cara_layers),
                               cara_heads=self.cara_heads,
                               cara_head_dim=self.hidden // self.cara_heads if self.cara_heads else 0,
                               max_positions=self.max_positions, kv_dtype=kv_dtype)

    def templates(self, kv_dtype: str = "float32") -> dict:
        """The manifest templates of a fused decoder entry: the contract, plus the spec `locpath build` rebuilds
        the INT4 and fp16 graphs from."""
        return dict(self.contract(kv_dtype).to_templates(), spec=self.to_dict())

    def expected_weights(self) -> dict[str, tuple]:
        """Name -> shape of every weight the graph is built from (MatMul weights as [in, out])."""
        h, kv, hd, d = self.num_heads, self.num_kv_heads, self.head_dim, self.hidden
        qkv = (h + 2 * kv) * hd
        w = {"embed": (self.vocab, d), "norm": (d,), "rope.cos_cache": (self.max_positions, hd // 2),
             "rope.sin_cache": (self.max_positions, hd // 2)}
        if not self.tied_embeddings:
            w["lm_head"] = (self.vocab, d)
        for j in range(self.num_layers):
            p = f"layers.{j}."
            w.update({p + "ln1": (d,), p + "qkv.weight": (d, qkv), p + "o.weight": (h * hd, d), p + "ln2": (d,),
                      p + "gate_up.weight": (d, 2 * self.intermediate), p + "down.weight": (self.intermediate, d)})
            if self.qkv_bias:
                w[p + "qkv.bias"] = (qkv,)
        for i in self.cara_layers:
            p = f"cara.{i}."
            w.update({p + "norm": (d,), p + "q.weight": (d, d), p + "o.weight": (d, d), p + "router.weight": (d, 1),
                      p + "router.bias": (1,), p + "attn_scale": (), p + "ffn_norm": (d,),
                      p + "fc1.weight": (d, self.cara_ffn), p + "fc1.bias": (self.cara_ffn,),
                      p + "fc2.weight": (self.cara_ffn, d), p + "fc2.bias": (d,), p + "ffn_scale": ()})
        return w

    def weight_bytes(self, quant: str, block_size: int = 32) -> int:
        """About what the graph's initializers take: what decides whether they go to external data."""
        per = {"fp32": 4.0, "fp16": 2.0, "int4": 0.5 + 4.0 / block_size}[quant]
        return int(sum(math.prod(s) for s in self.expected_weights().values()) * per)

    def check_weights(self, weights, source: str) -> None:
        """`weights`: a dict of arrays, or a lazy mapping with `shape_of(name)` (nothing is read to check it)."""
        want = self.expected_weights()
        missing = sorted(set(want) - set(weights))
        if missing:
            raise LocpathError(f"{source}: fused decoder weights missing: {', '.join(missing[:6])}"
                               + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
        shape_of = getattr(weights, "shape_of", None) or (lambda k: tuple(weights[k].shape))
        bad = [f"{k} {tuple(shape_of(k))} (want {want[k]})" for k in want if tuple(shape_of(k)) != want[k]]
        if bad:
            raise LocpathError(f"{source}: fused decoder weights of the wrong shape: {'; '.join(bad[:4])}")


# -- INT4 block quantization (the layout MatMulNBits and GatherBlockQuantized share) -------------------------
def quantize_int4_rows(w: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray, int]:
    """Quantize each row of w [N, K] in blocks of `block` along K, symmetric around zero point 8.

    Returns packed uint8 [N, n_blocks, block // 2] (low nibble first), scales float32 [N, n_blocks] and K.
    Dequantized: (q - 8) * scale. The extreme value of each block maps to -8 exactly (scale = extreme / -8),
    as ONNX Runtime's own symmetric quantizer does.
    """
    n, k = w.shape
    nb = -(-k // block)
    padded = np.zeros((n, nb * block), np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, nb, block)
    idx = np.abs(blocks).argmax(axis=2)
    extreme = np.take_along_axis(blocks, idx[..., None], axis=2)[..., 0]
    scale = (extreme / -8.0).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.rint(blocks / safe[..., None]) + 8, 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, scale, k


def dequantize_int4_rows(packed: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
    lo, hi = packed & 0x0F, packed >> 4
    q = np.stack([lo, hi], axis=-1).reshape(packed.shape[0], packed.shape[1], -1).astype(np.float32)
    return ((q - 8) * scale[..., None]).reshape(packed.shape[0], -1)[:, :k]


# -- graph writing ----------------------------------------------------------------------------------------
class ExternalData:
    """Initializer bytes appended to one `.data` file as they are made, so a graph larger than memory can be
    written: the graph keeps only a reference (offset, length) per tensor. Offsets are 64 KiB aligned, so ONNX
    Runtime can memory-map the weights."""

    ALIGN = 65536

    def __init__(self, path: Path, location: str):
        self.path, self.location = Path(path), location
        self._f = open(self.path, "wb")
        self.bytes = 0

    def add(self, name: str, dtype, shape: tuple, chunks) -> "object":
        from onnx import TensorProto, helper

        pad = -self.bytes % self.ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            self.bytes += pad
        start = self.bytes
        for c in chunks:
            b = np.ascontiguousarray(c, dtype=dtype).tobytes()
            self._f.write(b)
            self.bytes += len(b)
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        t.dims.extend(int(d) for d in shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(start)), ("length", str(self.bytes - start))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    def close(self):
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


class _Graph:
    """A tiny node/initializer accumulator with unique names; with `sink`, large initializers go straight to an
    external data file."""

    SMALL = 4096  # bytes: constants and norms stay inside the graph

    def __init__(self, sink: ExternalData | None = None):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits, self._n = [], {}, 0
        self.sink = sink

    def init(self, name: str, arr: np.ndarray) -> str:  # noqa: D401
        if name not in self.inits:
            arr = np.array(arr, order="C")
            if self.sink is not None and arr.nbytes > self.SMALL:
                self.inits[name] = self.sink.add(name, arr.dtype, arr.shape, [arr])
            else:
                self.inits[name] = self.numpy_helper.from_array(arr, name)
        return name

    def init_chunks(self, name: str, dtype, shape: tuple, chunks) -> str:
        """An initializer given as row chunks (what a streamed INT4 weight is); in memory without a sink."""
        if name not in self.inits:
            if self.sink is not None:
                self.inits[name] = self.sink.add(name, dtype, shape, chunks)
            else:
                arr = np.concatenate([np.asarray(c, dtype) for c in chunks]).reshape(shape)
                self.inits[name] = self.numpy_helper.from_array(arr, name)
        return name

    def const_i64(self, values) -> str:
        arr = np.asarray(values, np.int64)
        return self.init(f"const.i64.{'_'.join(str(v) for v in arr.ravel())}.{arr.ndim}d", arr)

    def node(self, op: str, inputs: list, n_out: int = 1, name: str | None = None, domain: str = "",
             outputs: list | None = None, **attrs):
        self._n += 1
        base = name or f"{op}_{self._n}"
        outs = outputs or [f"{base}/out{i}" for i in range(n_out)]
        self.nodes.append(self.helper.make_node(op, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs


class _Builder:
    ROWS = 2048  # rows quantized at a time: the temporaries of one chunk, not of the whole matrix

    def __init__(self, spec: FusedDecoderSpec, weights, quant: str, block: int, accuracy_level: int,
                 sink: ExternalData | None = None, progress=None):
        self.s, self.w, self.quant, self.block, self.acc = spec, weights, quant, block, accuracy_level
        self.ft = np.float16 if quant == "fp16" else np.float32  # activations, float weights, K/V
        self.g = _Graph(sink)
        self.quantized: list[str] = []
        self.float_matmuls: list[str] = []
        self.progress = progress or (lambda name: None)

    def rows(self, wname: str) -> np.ndarray:
        """A MatMul weight as [out, in] rows (the layout INT4 blocks run along): a lazy source hands them over
        directly, a dict holds [in, out]."""
        get = getattr(self.w, "rows", None)
        if get is not None:
            return get(wname)
        w = np.asarray(self.w[wname], np.float32)
        return w if wname in ("embed", "lm_head") else w.T  # the vocabulary matrices are [vocab, hidden] already

    def int4(self, wname: str, rows: np.ndarray, prefix: str, gather: bool = False) -> tuple[str, str]:
        """Quantize rows [N, K] chunk by chunk into `<prefix>.int4` [N, blocks, block/2] and `.scales` [N*blocks]
        (MatMulNBits' shapes), or with `gather` [N, blocks*block/2] and [N, blocks] (GatherBlockQuantized's: the
        same bytes, so no Reshape runs on them; ONNX Runtime would constant-fold one into a heap copy of the whole
        table, where the memory-mapped original is paged in only at the rows a question touches)."""
        n, k = rows.shape
        nb = -(-k // self.block)
        packed_chunks, scale_chunks = [], []
        for i in range(0, n, self.ROWS):
            p, sc, _ = quantize_int4_rows(rows[i:i + self.ROWS], self.block)
            packed_chunks.append(p)
            scale_chunks.append(sc.reshape(-1))
        shapes = ((n, nb * self.block // 2), (n, nb)) if gather else ((n, nb, self.block // 2), (n * nb,))
        b = self.g.init_chunks(prefix + ".int4", np.uint8, shapes[0], packed_chunks)
        sc = self.g.init_chunks(prefix + ".scales", np.float32, shapes[1], scale_chunks)
        self.progress(wname)
        return b, sc

    def f(self, wname: str) -> np.ndarray:
        """A float weight in the graph's float type."""
        return np.asarray(self.w[wname], self.ft)

    # weights [in, out] as a MatMul, quantized or not; `bias` (a weight name) added inside MatMulNBits
    def matmul(self, x: str, wname: str, min_k: int = 16, bias: str | None = None) -> str:
        rows = self.rows(wname)
        n, k = rows.shape
        if self.quant == "int4" and k >= min_k and n > 1:
            b, sc = self.int4(wname, rows, wname)
            del rows
            self.quantized.append(wname)
            extra = ["", "", self.g.init(bias, self.f(bias))] if bias else []  # zero points, g_idx, bias
            return self.g.node("MatMulNBits", [x, b, sc, *extra], domain=MS, name=wname.replace(".weight", ""),
                               K=k, N=n, bits=4, block_size=self.block, accuracy_level=self.acc)
        self.float_matmuls.append(wname)
        y = self.g.node("MatMul", [x, self.g.init(wname, np.asarray(rows).T.astype(self.ft))],
                        name=wname.replace(".weight", ""))
        return self.g.node("Add", [y, self.g.init(bias, self.f(bias))]) if bias else y

    def rms(self, x: str, wname: str, eps: float, skip: str | None = None) -> tuple[str, str]:
        """RMSNorm(x [+ skip]) -> (normed, residual sum)."""
        gamma = self.g.init(wname, self.f(wname))
        if skip is None:
            return self.g.node("SimplifiedLayerNormalization", [x, gamma], name=wname, axis=-1, epsilon=eps,
                               stash_type=1), x
        outs = self.g.node("SkipSimplifiedLayerNormalization", [x, skip, gamma], n_out=4, name=wname, domain=MS,
                           epsilon=eps)
        return outs[0], outs[3]

    def embedding(self, ids: str) -> str:
        """Gather, or with INT4 GatherBlockQuantized: over the lm_head's own INT4 tensor when tied (one copy
        serves both), over its own INT4 tensor when not (the fp32 vocabulary matrix is the largest weight)."""
        s = self.s
        if self.quant != "int4":
            embed = np.asarray(self.w["embed"], self.ft)
            return self.g.node("Gather", [self.g.init("embed", embed), ids], name="embed")
        data, scales = self.int4("embed", self.rows("embed"), "embed", gather=not s.tied_embeddings)
        if s.tied_embeddings:  # one tensor in MatMulNBits' shape serves both: reshaped for the gather
            self._lm_int4 = (data, scales)
            data = self.g.node("Reshape", [data, self.g.const_i64([s.vocab, -1])], name="embed.reshape")
            scales = self.g.node("Reshape", [scales, self.g.const_i64([s.vocab, -1])], name="embed.scales2d")
        self.quantized.append("embed")
        h = self.g.node("GatherBlockQuantized", [data, ids, scales], domain=MS, name="embed", bits=4,
                        block_size=self.block, gather_axis=0, quantize_axis=1)
        if -(-s.hidden // self.block) * self.block != s.hidden:  # rows padded to whole blocks
            h = self.g.node("Slice", [h, self.g.const_i64([0]), self.g.const_i64([s.hidden]), self.g.const_i64([-1])])
        return h

    def lm_head(self, x2d: str) -> str:
        s = self.s
        if self.quant == "int4":
            if s.tied_embeddings:
                b, sc = self._lm_int4
            else:
                b, sc = self.int4("lm_head", self.rows("lm_head"), "lm_head")
            self.quantized.append("lm_head")
            return self.g.node("MatMulNBits", [x2d, b, sc], domain=MS, name="lm_head", K=s.hidden, N=s.vocab, bits=4,
                               block_size=self.block, accuracy_level=self.acc)
        wname = "embed" if s.tied_embeddings else "lm_head"
        self.float_matmuls.append(wname)
        return self.g.node("Gemm", [x2d, self.g.init(wname, self.f(wname))], name="lm_head",
                           transB=1)

    def cara(self, h: str, i: int) -> str:
        s, p = self.s, f"cara.{i}."
        x, _ = self.rms(h, p + "norm", s.cara_eps)
        q = self.matmul(x, p + "q.weight")
        att = self.g.node("MultiHeadAttention", [q, *cross_names(i)], domain=MS,
                          name=p + "cross_attention", num_heads=s.cara_heads)
        route = self.g.node("Sigmoid", [self.g.node("Add", [self.matmul(x, p + "router.weight"),
                                                             self.g.init(p + "router.bias", self.f(p + "router.bias"))])])
        gate = self.g.node("Mul", [route, self.g.init(p + "attn_scale", self.f(p + "attn_scale"))])
        h = self.g.node("Add", [h, self.g.node("Mul", [gate, self.matmul(att, p + "o.weight")])], name=p + "attn_residual")
        y, _ = self.rms(h, p + "ffn_norm", s.cara_eps)
        y = self.g.node("Add", [self.matmul(y, p + "fc1.weight"), self.g.init(p + "fc1.bias", self.f(p + "fc1.bias"))])
        y = self.g.node("Gelu", [y], domain=MS)
        y = self.g.node("Add", [self.matmul(y, p + "fc2.weight"), self.g.init(p + "fc2.bias", self.f(p + "fc2.bias"))])
        y = self.g.node("Mul", [y, self.g.init(p + "ffn_scale", self.f(p + "ffn_scale"))])
        return self.g.node("Add", [h, y], name=p + "ffn_residual")

    def build(self):
        s, g = self.s, self.g
        helper = g.helper
        from onnx import TensorProto

        cos = g.init("rope.cos_cache", self.f("rope.cos_cache"))
        sin = g.init("rope.sin_cache", self.f("rope.sin_cache"))
        # attention mask -> GroupQueryAttention's seqlens_k (valid length - 1) and total length
        msum = g.node("ReduceSum", ["attention_mask", g.const_i64([1])], keepdims=0, name="mask.sum")
        seqlens = g.node("Cast", [g.node("Sub", [msum, g.const_i64(1)])], to=TensorProto.INT32, name="seqlens_k")
        total = g.node("Cast", [g.node("Gather", [g.node("Shape", ["attention_mask"]), g.const_i64(1)], axis=0)],
                       to=TensorProto.INT32, name="total_sequence_length")
        split_mlp = g.const_i64([s.intermediate, s.intermediate])

        h = self.embedding("input_ids")
        if s.embeds_input:
            h = g.node("Concat", ["inputs_embeds", h], axis=1, name="embeds.concat")
        pending = None  # (mlp output, residual) not yet added
        for j in range(s.num_layers):
            p = f"layers.{j}."
            if j in s.cara_layers:
                if pending is not None:
                    h = g.node("Add", list(pending))
                    pending = None
                h = self.cara(h, j)
            if pending is None:
                x, h = self.rms(h, p + "ln1", s.rms_eps)
            else:
                x, h = self.rms(pending[0], p + "ln1", s.rms_eps, skip=pending[1])
            qkv = self.matmul(x, p + "qkv.weight", bias=p + "qkv.bias" if s.qkv_bias else None)
            # packed Q|K|V straight into GroupQueryAttention (key and value inputs left empty): no Split
            att = g.node("GroupQueryAttention", [qkv, "", "", *past_names(j), seqlens, total, cos, sin],
                         domain=MS, name=p + "attention", outputs=[p + "attention/out0", *present_names(j)],
                         num_heads=s.num_heads, kv_num_heads=s.num_kv_heads, do_rotary=1, rotary_interleaved=0)
            o = self.matmul(att, p + "o.weight")
            x, h = self.rms(o, p + "ln2", s.rms_eps, skip=h)
            gate, up = g.node("Split", [self.matmul(x, p + "gate_up.weight"), split_mlp], n_out=2, axis=-1,
                              name=p + "gate_up.split")
            act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])]), up], name=p + "swiglu")
            pending = (self.matmul(act, p + "down.weight"), h)
        # last position only: the generator samples from it
        last_out = g.node("Slice", [pending[0], g.const_i64([-1]), g.const_i64([np.iinfo(np.int64).max]),
                                    g.const_i64([1])], name="last.mlp")
        last_res = g.node("Slice", [pending[1], g.const_i64([-1]), g.const_i64([np.iinfo(np.int64).max]),
                                    g.const_i64([1])], name="last.residual")
        x, _ = self.rms(last_out, "norm", s.rms_eps, skip=last_res)
        x2d = g.node("Reshape", [x, g.const_i64([-1, s.hidden])], name="last.flatten")
        logits2d = self.lm_head(x2d)
        if self.ft == np.float16:  # the sampler reads float32 logits
            logits2d = g.node("Cast", [logits2d], name="logits.float32", to=TensorProto.FLOAT)
        g.node("Reshape", [logits2d, g.const_i64([-1, 1, s.vocab])], name="logits.reshape", outputs=["logits"])

        types = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64}
        contract = s.contract("float16" if self.ft == np.float16 else "float32")
        inputs = [helper.make_tensor_value_info(d.name, types[d.dtype], list(d.shape)) for d in contract.inputs()]
        if s.embeds_input:
            inputs.insert(1, helper.make_tensor_value_info("inputs_embeds", types[contract.kv_dtype],
                                                           ["batch", "visual", s.hidden]))
        outputs = [helper.make_tensor_value_info(d.name, types[d.dtype], list(d.shape)) for d in contract.outputs()]
        graph = helper.make_graph(g.nodes, "locpath_fused_decoder", inputs, outputs, list(g.inits.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                                  producer_name="locpath.fused_graph")
        model.ir_version = 8
        return model


def build_fused_decoder(spec: FusedDecoderSpec, weights, out: str | os.PathLike,
                        quant: str = "fp32", block_size: int = 32, accuracy_level: int = 4,
                        source: str = "weights", external: bool | None = None, progress=None) -> dict:
    """Write the fused decoder ONNX to `out` (atomically) and return what was done.

    `weights`: a dict of arrays, or a lazy source (`engines/fused_stream.py`) that reads each weight when the
    graph reaches it. `external`: weights in `<out>.data` beside the graph, appended as they are made, so the
    process never holds more than one weight matrix (default: when the weights pass protobuf's 2 GB limit).
    """
    if quant not in ("fp32", "int4", "fp16"):
        raise LocpathError(f"fused decoder precision must be fp32, int4 or fp16, not {quant!r}")
    if spec.head_dim % 2:
        raise LocpathError(f"{source}: rotary needs an even head_dim, got {spec.head_dim}")
    spec.check_weights(weights, source)
    if external is None:
        external = spec.weight_bytes(quant, block_size) > 1_800_000_000
    b, model, data_name, ops = write_graph(
        lambda sink: _Builder(spec, weights, quant, block_size, accuracy_level, sink=sink, progress=progress),
        out, external)
    return {"method": "locpath fused decoder graph (GroupQueryAttention, rotary inside, shared KV buffers)",
            "precision": quant, "nodes": len(model.graph.node), "ops": ops,
            "int4_weights": len(b.quantized) if quant == "int4" else 0,
            "float_matmul_weights": b.float_matmuls, "block_size": block_size if quant == "int4" else None,
            "accuracy_level": accuracy_level if quant == "int4" else None,
            "data_file": data_name,
            "embedding": ("Gather fp32" if quant != "int4" else "GatherBlockQuantized (shared with lm_head)"
                          if spec.tied_embeddings else "GatherBlockQuantized")}


def write_graph(make_builder, out: str | os.PathLike, external: bool):
    """Build a graph with `make_builder(sink)` (sink None, or `ExternalData` appending weights to `<out>.data` as
    they are made) and write it to `out`, both files atomically. Returns (builder, model, data file name or None,
    op counts): what the fused decoder and its prefill graph report."""
    import onnx

    from ..fsutil import atomic_file

    out = Path(out)
    data_name = out.name + ".data" if external else None
    if external:
        with atomic_file(out.parent / data_name) as tmp_data:
            sink = ExternalData(tmp_data, data_name)
            try:
                b = make_builder(sink)
                model = b.build()
            finally:
                sink.close()
            with atomic_file(out) as tmp:
                onnx.save_model(model, str(tmp))
    else:
        b = make_builder(None)
        model = b.build()
        with atomic_file(out) as tmp:
            onnx.save_model(model, str(tmp))
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return b, model, data_name, ops


def weights_from_fused_onnx(path: str | os.PathLike, spec: FusedDecoderSpec) -> dict[str, np.ndarray]:
    """Read the fp32 fused graph's named weights back (what `locpath build` re-quantizes)."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:
        raise LocpathError(f"{path}: cannot read the fused decoder ({exc})") from exc
    want = spec.expected_weights()
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in want}
    spec.check_weights(out, str(path))
    return out
