"""The INT4 fused decoder on OpenVINO: the same graph and the same INT4 bytes (its data file is shared, not
copied), with the one op OpenVINO's ONNX reader lacks written in plain ONNX ops.

Why: on this project's AMX Xeons ONNX Runtime's MatMulNBits has no AMX path, so a 7B prompt is compute-bound
(219 ms per 1.15 GB of INT4 weights at 13 tokens); OpenVINO's CPU plugin reads the same `MatMulNBits` nodes into
its compressed-weight matmuls (74 ms there, 2.2x; a single token 45 against 54 ms). Its reader also takes
`GroupQueryAttention`, `MultiHeadAttention` and the RMSNorm ops of fused_graph.py, but not
`GatherBlockQuantized` (the embedding rows read from the INT4 table). Here that gather becomes Gather of the
packed rows and of their scales, nibbles split with Mod/Div, (q - 8) * scale: only the rows a prompt touches
are dequantized, as GatherBlockQuantized does, and no float copy of the table is made.

OpenVINO's GroupQueryAttention returns the valid K/V (total length), not the shared max-length buffer, so its
runner copies each step's present back into the cache (runtime/openvino_runner.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import LocpathError


def openvino_fused_variant(src: str | Path, out: str | Path, hidden: int) -> dict:
    """Write `out` (beside `src`, reading the same external data file) from the INT4 fused graph `src`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    src, out = Path(src), Path(out)
    if src.parent.resolve() != out.parent.resolve():
        raise LocpathError(f"{out}: the OpenVINO variant must sit beside {src.name} (it reads the same data file)")
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    nodes, replaced = [], 0
    for n in g.node:
        if n.op_type != "GatherBlockQuantized" or n.domain != "com.microsoft":
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if attrs.get("bits", 4) != 4 or attrs.get("gather_axis", 0) != 0 or attrs.get("quantize_axis", 1) not in (1, -1) \
                or len(n.input) > 3 and n.input[3]:
            raise LocpathError(f"{src}: GatherBlockQuantized {n.name!r} is not the INT4 row gather this variant "
                               f"rewrites ({attrs}, {len(n.input)} inputs)")
        nodes += _dequant_gather(n, int(attrs.get("block_size", 128)), hidden, g, helper, numpy_helper, TensorProto)
        replaced += 1
    if not replaced:
        raise LocpathError(f"{src}: no INT4 embedding gather found: not an INT4 fused decoder graph")
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(out))  # initializers keep their external references: the data file is read in place
    return {"replaced_gathers": replaced, "graph_bytes": out.stat().st_size}


def _dequant_gather(n, block: int, hidden: int, g, helper, numpy_helper, TensorProto) -> list:
    data, ids, scales = n.input[:3]
    p = (n.name or n.output[0]) + ".ov"
    consts = {"16": np.int32(16), "8": np.float32(8), "last": np.array([-1], np.int64),
              "blk": np.array([block], np.int64), "zero": np.array([0], np.int64),
              "two": np.array([2], np.int64), "hidden": np.array([hidden], np.int64)}
    for k, v in consts.items():
        g.initializer.append(numpy_helper.from_array(np.asarray(v), f"{p}.{k}"))
    c = {k: f"{p}.{k}" for k in consts}
    mk = helper.make_node
    return [
        mk("Gather", [data, ids], [f"{p}.rows"], axis=0),                  # [B, S, K/2] packed
        mk("Cast", [f"{p}.rows"], [f"{p}.r32"], to=TensorProto.INT32),
        mk("Mod", [f"{p}.r32", c["16"]], [f"{p}.lo"]),                     # low nibble first (quantize_int4_rows)
        mk("Div", [f"{p}.r32", c["16"]], [f"{p}.hi"]),
        mk("Unsqueeze", [f"{p}.lo", c["last"]], [f"{p}.lo1"]),
        mk("Unsqueeze", [f"{p}.hi", c["last"]], [f"{p}.hi1"]),
        mk("Concat", [f"{p}.lo1", f"{p}.hi1"], [f"{p}.q"], axis=-1),       # [B, S, K/2, 2]
        mk("Gather", [scales, ids], [f"{p}.sc"], axis=0),                  # [B, S, blocks]
        mk("Shape", [f"{p}.sc"], [f"{p}.shape"]),
        mk("Concat", [f"{p}.shape", c["blk"]], [f"{p}.shape4"], axis=0),
        mk("Reshape", [f"{p}.q", f"{p}.shape4"], [f"{p}.qb"]),             # [B, S, blocks, block]
        mk("Cast", [f"{p}.qb"], [f"{p}.qf"], to=TensorProto.FLOAT),
        mk("Sub", [f"{p}.qf", c["8"]], [f"{p}.qc"]),
        mk("Unsqueeze", [f"{p}.sc", c["last"]], [f"{p}.sc1"]),
        mk("Mul", [f"{p}.qc", f"{p}.sc1"], [f"{p}.w"]),
        mk("Slice", [f"{p}.shape", c["zero"], c["two"]], [f"{p}.bs"]),
        mk("Concat", [f"{p}.bs", c["last"]], [f"{p}.shape3"], axis=0),
        mk("Reshape", [f"{p}.w", f"{p}.shape3"], [f"{p}.padded"]),          # [B, S, blocks * block]
        mk("Slice", [f"{p}.padded", c["zero"], c["hidden"], c["last"]], list(n.output)),  # the real hidden width
    ]
