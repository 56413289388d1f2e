"""A TIS graph that embeds questions with the decoder's own embedding rows instead of a copy of them.

LoC-Path's TIS embeds the question with the LLM's embedding matrix (the release key map's `from` rule): at
Qwen2.5-7B width that copy is 545 M parameters (2.2 GB in fp32), a second time beside the decoder's. Here the TIS
graph is exported with a stand-in table of DUMMY_ROWS rows, and its Gather is then pointed at the decoder's
embedding tensors in the decoder's external data file (an ONNX external-data reference: the same file, offset and
length): a plain Gather over the fp32 table, or GatherBlockQuantized over the INT4 one (the decoder's own op and
bytes, read as [vocab, hidden/2] data and [vocab, blocks] scales). Nothing changes at run time: the graph still
takes `question_ids`; ONNX Runtime memory-maps the referenced bytes, so only the rows of a question's tokens are
ever read. Old bundles (a TIS with its own table) run as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import LocpathError

DUMMY_ROWS = 3  # rows of the stand-in table the TIS is exported with (found again by this shape)
MS = "com.microsoft"


def shares_llm_embedding(model, hf, chunk: int = 8192) -> bool:
    """Whether the TIS's table is the LLM's embedding matrix: its width is the LLM's and it is either declared so
    (left on the meta device: `from` the LLM) or equal to the folder's embedding row for row."""
    w = model.tis.embed.weight
    name = "model.embed_tokens.weight"
    if name not in hf.weights.entries or tuple(w.shape) != tuple(hf.weights.shape(name)):
        return False
    if w.is_meta:
        return True
    for i in range(0, w.shape[0], chunk):
        rows = hf.weights.array(name, slice(i, i + chunk))
        if not np.array_equal(rows, w[i:i + chunk].detach().float().numpy()):
            return False
    return True


def stand_in_table(model) -> None:
    """Replace the TIS's table with DUMMY_ROWS rows before export (the graph's Gather is re-pointed after)."""
    import torch
    from torch import nn

    q = model.tis.embed.embedding_dim
    model.tis.embed = nn.Embedding(DUMMY_ROWS, q)
    model.tis.stand_in_rows = DUMMY_ROWS  # the export's sample question ids stay inside it (export/configs.py)
    with torch.no_grad():
        model.tis.embed.weight.normal_()  # distinct rows: the export's validation then checks the pooling too


def point_at_decoder(tis_path: Path, decoder_path: Path, quant: str, block: int, hidden: int) -> None:
    """Rewrite `tis_path` so its Gather reads the decoder's embedding (see the module docstring)."""
    import onnx
    from onnx import helper

    dec = onnx.load(str(decoder_path), load_external_data=False)
    dinit = {t.name: t for t in dec.graph.initializer}
    tis = onnx.load(str(tis_path))
    g = tis.graph
    own = {t.name: t for t in g.initializer}
    hits = [n for n in g.node if n.op_type == "Gather" and n.input[0] in own
            and list(own[n.input[0]].dims) == [DUMMY_ROWS, hidden]]
    if len(hits) != 1:
        raise LocpathError(f"{tis_path}: cannot find the TIS's embedding Gather ({len(hits)} candidates)")
    gather, dummy = hits[0], own[hits[0].input[0]]
    names = ["embed"] if quant != "int4" else ["embed.int4", "embed.scales"]
    refs = []
    for name in names:
        t = dinit.get(name)
        if t is None or t.data_location != onnx.TensorProto.EXTERNAL:
            raise LocpathError(f"{decoder_path}: no external tensor {name!r} for the TIS to share")
        ref = onnx.TensorProto()
        ref.CopyFrom(t)
        ref.name = "tis.shared." + name
        refs.append(ref)
    if quant == "int4":
        vocab, nb = refs[0].dims[0], -(-hidden // block)
        for ref, dims in zip(refs, ([vocab, nb * block // 2], [vocab, nb])):
            del ref.dims[:]
            ref.dims.extend(dims)  # the same bytes as GatherBlockQuantized reads them (tied tables are 3-D/1-D)
        node = helper.make_node("GatherBlockQuantized", [refs[0].name, gather.input[1], refs[1].name],
                                list(gather.output), name="tis.embed", domain=MS, bits=4, block_size=block,
                                gather_axis=0, quantize_axis=1)
        g.node.insert(list(g.node).index(gather), node)
        g.node.remove(gather)
        if not any(o.domain == MS for o in tis.opset_import):
            tis.opset_import.append(helper.make_opsetid(MS, 1))
    else:
        gather.input[0] = refs[0].name
    g.initializer.remove(dummy)
    g.initializer.extend(refs)
    onnx.save_model(tis, str(tis_path))
