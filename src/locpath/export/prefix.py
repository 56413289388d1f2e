"""The prefix baseline (SlideChat-style: every tile token projected into the LLM's input) exported the way a
LoC-Path bundle is, so the headline compares the two on one runtime and one precision (bench/headline.py):

- `projector.onnx` (locpath's exporter, validated against PyTorch): features [N, F] and grid [N, 2] -> visual
  tokens [1, N, D], the 2-D sin/cos position term inside, as `PrefixModel.visual_tokens` computes it;
- `decoder_fused[.int4].onnx` (engines/fused_graph.py with `embeds_input`): the same fused GroupQueryAttention
  graph as a LoC-Path bundle's decoder, with no CARA layers and an `inputs_embeds` input placed before the
  embedded prompt ids; fp32 or INT4 (MatMulNBits, the lm_head and the INT4 embedding shared) as asked.

Written once into a folder with `prefix.json` (spec, precision, sources); a folder whose `prefix.json` matches
the request is reused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from ..engines.fused_graph import FusedDecoderSpec, build_fused_decoder
from ..errors import LocpathError
from ..fsutil import atomic_file
from ..models.layers import sincos_2d
from .configs import ExportConfig, TensorSpec
from .exporter import export_component, validate_component

PROJECTOR = "projector"
FORMAT = "locpath-prefix/1"


class PrefixProjector(nn.Module):
    """`PrefixModel.visual_tokens` for one slide as a graph: projector(features) + 0.1 * sincos(grid)."""

    def __init__(self, projector: nn.Module, hidden: int):
        super().__init__()
        self.projector, self.hidden = projector, hidden

    def forward(self, features, grid):
        pos = sincos_2d(grid.float().unsqueeze(0), self.hidden)
        return (self.projector(features) + pos[0] * 0.1).unsqueeze(0)


def random_projector(feature_dim: int, projector_hidden: int, hidden: int, seed: int = 0) -> nn.Module:
    """PrefixModel's projector shape with seeded random weights (the 0.5B-shaped baseline has no trained one)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(feature_dim, projector_hidden), nn.GELU(), nn.Linear(projector_hidden, hidden))


class _ProjectorExport(ExportConfig):
    def module(self, model):
        return model

    def make_input(self, model, spec, shape, dims, g):
        if spec.name == "grid":
            return torch.randint(0, 200, shape, generator=g).float()
        return torch.randn(shape, generator=g)


def projector_config(feature_dim: int, hidden: int) -> ExportConfig:
    return _ProjectorExport(
        component=PROJECTOR,
        inputs=[TensorSpec("features", "float32", ("tiles", feature_dim)),
                TensorSpec("grid", "float32", ("tiles", 2))],
        outputs=[TensorSpec("visual_tokens", "float32", (1, "tiles", hidden))],
        sample_dims={"tiles": 7}, check_dims=[{"tiles": 1}, {"tiles": 300}],
        description="tile features + grid -> the prefix's visual tokens (projector + 2-D position term)")


def prefix_spec(llm_spec: FusedDecoderSpec, max_positions: int) -> FusedDecoderSpec:
    """The fused decoder spec of a plain LLM taking visual tokens before its prompt."""
    return dataclasses.replace(llm_spec, cara_layers=[], cara_heads=0, cara_ffn=0, embeds_input=True,
                               max_positions=int(max_positions))


def _wanted(meta: dict, folder: Path) -> bool:
    p = folder / "prefix.json"
    if not p.is_file():
        return False
    try:
        have = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(have.get(k) == v for k, v in meta.items()) and all(
        (folder / have.get(f, "")).is_file() for f in ("projector", "decoder"))


def write_prefix(folder: Path, projector: PrefixProjector, spec: FusedDecoderSpec, weights, quant: str,
                 block_size: int, source: dict, log=print) -> dict:
    """Export the projector (validated) and write the fused decoder into `folder`; return prefix.json."""
    folder = Path(folder)
    meta = {"format": FORMAT, "quant": quant, "block_size": block_size if quant == "int4" else None,
            "spec": spec.to_dict(), "source": source}
    if _wanted(meta, folder):
        return json.loads((folder / "prefix.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    ec = projector_config(int(projector.projector[0].in_features), projector.hidden)
    rep = export_component(ec, projector, folder)
    diff = validate_component(ec, projector, folder / rep.file)
    name = "decoder_fused.onnx" if quant == "fp32" else f"decoder_fused.{quant}.onnx"
    log(f"prefix baseline: writing its fused decoder ({quant}, {spec.num_layers} layers, "
        f"{spec.max_positions} positions)")
    info = build_fused_decoder(spec, weights, folder / name, quant=quant, block_size=block_size,
                               source=source.get("llm", "prefix"))
    meta.update({"projector": rep.file, "decoder": name, "projector_max_abs_diff": diff,
                 "decoder_build": {k: v for k, v in info.items() if k != "ops"}})
    with atomic_file(folder / "prefix.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return meta


def export_prefix_checkpoint(model, folder: Path, quant: str, block_size: int, max_positions: int,
                             log=print) -> dict:
    """A PrefixModel (the shipped prefix checkpoint) -> its projector and fused decoder in `folder`."""
    from .fused import fused_spec, fused_weights

    if not hasattr(model, "projector"):
        raise LocpathError("export_prefix_checkpoint takes a PrefixModel (fusion 'prefix')")
    plain = SimpleNamespace(llm=model.llm, cara=None, cfg=model.cfg)  # fused_spec/fused_weights without CARA
    spec = prefix_spec(fused_spec(plain, max_positions), max_positions)
    digest = _state_digest(model)
    return write_prefix(folder, PrefixProjector(model.projector, model.hidden).eval(), spec,
                        _lazy(lambda: fused_weights(plain, spec), spec), quant, block_size,
                        {"model": digest}, log)


def export_prefix_hf(hf, folder: Path, feature_dim: int, projector_hidden: int, quant: str, block_size: int,
                     max_positions: int, seed: int = 0, log=print) -> dict:
    """The same LLM as a HF folder (streamed from its shards, as a published-scale bundle's decoder) with a
    seeded random projector of PrefixModel's shape -> `folder`."""
    from ..engines.fused_stream import HFFusedWeights, spec_from_hf

    spec = prefix_spec(spec_from_hf(hf, max_positions), max_positions)
    proj = PrefixProjector(random_projector(feature_dim, projector_hidden, spec.hidden, seed), spec.hidden).eval()
    return write_prefix(folder, proj, spec, HFFusedWeights(hf, spec, None, {}), quant, block_size,
                        {"llm": str(hf.folder), "projector_seed": seed, "feature_dim": feature_dim,
                         "projector_hidden": projector_hidden}, log)


class _lazy(dict):
    """A weight dict built only when the graph writer first reads it (a cached folder never builds it)."""

    def __init__(self, make, spec: FusedDecoderSpec):
        super().__init__()
        self._make, self._shapes = make, spec.expected_weights()

    def _fill(self):
        if self._make is not None:
            self.update(self._make())
            self._make = None

    def __contains__(self, k):
        return k in self._shapes

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self):
        return len(self._shapes)

    def keys(self):
        return self._shapes.keys()

    def shape_of(self, k):
        return self._shapes[k]

    def __getitem__(self, k):
        self._fill()
        return super().__getitem__(k)


def _state_digest(model) -> str:
    """A short digest of the model's weights: what makes a cached export stale."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v.detach().float().cpu().numpy()).tobytes()[:4096])
        h.update(str(tuple(v.shape)).encode())
    return h.hexdigest()[:16]


def torch_prefix_tokens(model, tok, features: np.ndarray, grid: np.ndarray, question: str, max_new: int) -> list[int]:
    """The PyTorch prefix model's greedy answer tokens (what the exported graphs must reproduce)."""
    from ..models.slide_llm import SlideFeatures

    with torch.no_grad():
        vis = model.visual_tokens([SlideFeatures(features, grid)])
        return model.answer_tokens(tok, vis, [question], max_new=max_new)[0]


__all__ = ["PrefixProjector", "export_prefix_checkpoint", "export_prefix_hf", "prefix_spec", "random_projector",
           "torch_prefix_tokens", "write_prefix"]
