"""`locpath export`: a trained checkpoint -> a validated, versioned bundle that needs no torch to run.

The bundle is assembled in a temporary folder beside OUT_DIR and renamed into place only when every
component exported and validated, so a failed export leaves nothing behind. Every file is listed in the
manifest (sha256 and size) and SHA256SUMS covers the manifest and the files.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import time
from pathlib import Path

from .. import __version__
from ..bundle import names
from ..bundle.integrity import write_manifest
from ..bundle.manifest import (ComponentEntry, GenerationDefaults, IOSpec, Manifest, Preprocessing, TokenizerEntry)
from ..bundle.paths import sha256_file
from ..errors import LocpathError
from ..fsutil import atomic_dir
from ..text import CHAT_TEMPLATE, IM_END, IM_START, PAD
from .configs import export_configs
from .exporter import ComponentReport, export_component, validate_component

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def component_profiles(component: str, cfg_axes: set[str], model, max_length: int) -> dict:
    """min/opt/max per symbolic axis: what a TensorRT optimisation profile is built from. The decoder's cover
    the whole KV capacity (`generation.max_length`), so no prompt the runtime accepts falls outside them."""
    c = model.cfg
    table = {
        "batch": [1, 32, 64] if component == names.TILE_ENCODER else [1, 1, 16],  # the runtime encodes 32 tiles a call
        "tokens": [1, 2048, 65536],
        "question_len": [1, 16, 128],
        "selected": [c.tis.top_m] * 3,
        "sequence": [1, 32, max_length],
        "past": [0, 32, max_length],
        "total": [1, 64, max_length],
    }
    return {a: table[a] for a in sorted(cfg_axes) if a in table}


def write_bundle_manifest(tmp: Path, cfg, components: dict, max_length: int, source: dict, export: dict) -> None:
    """The manifest of a bundle assembled in `tmp`: preprocessing at the tile encoder's own geometry, the ChatML
    tokens, every referenced file hashed, SHA256SUMS written."""
    from ..models.encoders import tile_target_mpp

    manifest = Manifest(
        fusion=cfg.fusion, model=cfg.to_dict(), components=components,
        preprocessing=Preprocessing(
            tile_size=cfg.tile_encoder.img_size, target_mpp=tile_target_mpp(cfg), mean=list(cfg.tile_encoder.mean),
            std=list(cfg.tile_encoder.std), stm=dataclasses.asdict(cfg.stm)),
        tokenizer=TokenizerEntry(file="tokenizer.json", chat_template=CHAT_TEMPLATE_FILE, pad=PAD,
                                 im_start=IM_START, im_end=IM_END),
        generation=GenerationDefaults(max_new_tokens=cfg.max_answer_tokens, stop_tokens=[IM_END],
                                      max_length=max_length),
        locpath_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        source=source, export=export)
    for name in dict.fromkeys(manifest.referenced_files()):  # a data file two graphs share is hashed once
        manifest.record_file(tmp, name)
    write_manifest(tmp, manifest)


def export_graph(ec, model, tmp: Path, validate: bool, max_length: int, log) -> tuple[ComponentEntry, ComponentReport]:
    """One component exported (and validated) into the bundle being assembled, with its manifest entry."""
    rep = export_component(ec, model, tmp)
    if validate:
        validate_component(ec, model, tmp / rep.file, rep)
    log(f"export: {ec.component} -> {rep.file} ({rep.nodes} nodes, {rep.seconds:.1f} s"
        + (f", max abs diff {max(rep.max_abs_diff.values()):.2e})" if rep.max_abs_diff else ")"))
    entry = ComponentEntry(
        file=rep.file, sha256=sha256_file(tmp / rep.file), precision="fp32", backend="onnxruntime",
        inputs=[IOSpec(s.name, s.dtype, list(s.shape)) for s in ec.inputs],
        outputs=[IOSpec(s.name, s.dtype, list(s.shape)) for s in ec.outputs],
        templates=ec.templates, description=ec.description,
        profiles=component_profiles(ec.component, ec.axes(), model, max_length),
        data_files=list(rep.data_files),
    )
    return entry, rep


def export_fused_decoder(model, tmp: Path, max_length: int, validate: bool, log):
    """The fused decoder graph beside the plain one: faster on ONNX Runtime, which the runtime prefers. A model
    the fused builder does not support (rope variant, MLP kind) keeps only the plain graph, with a message."""
    from ..engines.fused_graph import build_fused_decoder
    from .fused import fused_decoder_inputs, validate_fused

    t0 = time.time()
    try:
        spec, weights = fused_decoder_inputs(model, max_length)
    except LocpathError as exc:
        log(f"export: no fused decoder ({exc})")
        return None
    name = f"{names.DECODER_FUSED}.onnx"
    info = build_fused_decoder(spec, weights, tmp / name, quant="fp32", source="the checkpoint")
    diff = {"logits": validate_fused(tmp / name, model, spec)} if validate else {}
    rep = ComponentReport(component=names.DECODER_FUSED, file=name, nodes=info["nodes"], seconds=time.time() - t0,
                          max_abs_diff=diff)
    log(f"export: {names.DECODER_FUSED} -> {name} ({info['nodes']} nodes, {rep.seconds:.1f} s"
        + (f", max abs diff {diff['logits']:.2e})" if diff else ")"))
    contract = spec.contract()
    entry = ComponentEntry(
        file=name, sha256=sha256_file(tmp / name), precision="fp32", backend="onnxruntime",
        inputs=[IOSpec.from_decl(d) for d in contract.inputs()], outputs=[IOSpec.from_decl(d) for d in contract.outputs()],
        templates=spec.templates(),
        description="the decoder as ONNX Runtime contrib ops: GroupQueryAttention (rotary inside, past/present "
                    "share one max-length buffer), SkipSimplifiedLayerNormalization, last-position logits",
        profiles={})
    return entry, rep


def export_bundle(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, validate: bool = True,
                  overwrite: bool = False, log=print) -> tuple[Path, dict]:
    import torch

    from ..models.checkpoint import load_checkpoint
    from ..models.llm import sync_llm_config
    from ..models.slide_llm import LocPathModel

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise LocpathError(f"{out}: already exists (pass --overwrite to replace it)")
    t_start = time.time()
    torch.set_num_threads(2)
    model, tok = load_checkpoint(checkpoint)
    if not isinstance(model, LocPathModel):
        raise LocpathError(f"{checkpoint}: only LoC-Path (fusion 'cara') checkpoints export to a bundle so far")
    cfg = model.cfg
    cfg.llm = sync_llm_config(cfg.llm, model.llm)  # record the loaded LLM's real sizes
    max_length = min(cfg.llm.max_position_embeddings, 512)
    with atomic_dir(out) as tmp:
        components: dict[str, ComponentEntry] = {}
        reports: dict[str, ComponentReport] = {}
        for ec in export_configs(model):
            components[ec.component], reports[ec.component] = export_graph(ec, model, tmp, validate, max_length, log)
        fused = export_fused_decoder(model, tmp, max_length, validate, log)
        if fused is not None:
            components[names.DECODER_FUSED], reports[names.DECODER_FUSED] = fused
        tok.save(str(tmp / "tokenizer.json"))
        # the checkpoint's own template (an imported LLM's), as PyTorch rendered it (load_checkpoint); ChatML if none
        template = getattr(model, "chat_template", None)
        (tmp / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE if template is None else template.text, encoding="utf-8")
        weights = Path(checkpoint) / "model.safetensors"
        write_bundle_manifest(tmp, cfg, components, max_length,
                              source={"checkpoint": str(checkpoint),
                                      "weights_sha256": sha256_file(weights) if weights.exists() else None},
                              export={"torch": torch.__version__, "exporter": "torch.onnx dynamo",
                                      "seconds": round(time.time() - t_start, 1),
                                      "validation": {k: r.max_abs_diff for k, r in reports.items()}})
    size = sum(p.stat().st_size for p in out.iterdir())
    summary = {"bundle": str(out), "seconds": round(time.time() - t_start, 1), "bytes": size,
               "max_abs_diff": {k: r.max_abs_diff for k, r in reports.items()}}
    log(f"export: bundle {out} ({size / 1e6:.1f} MB) in {summary['seconds']} s")
    return out, summary
