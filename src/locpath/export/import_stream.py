"""`locpath import` at published scale: the checkpoint written tensor by tensor, never holding the LLM.

Importing Qwen2.5-7B in memory needs ~37 GB (the model in bf16 plus safetensors' copy while saving), so above
2 B LLM parameters (or with `--stream on`) the importer takes this path instead: the LocPathModel is built with its
LLM on the meta device (the resampler, TIS, CARA and tile encoder are real and take the release's tensors as in
the in-memory path), and model.safetensors is written one tensor at a time: the adapter tensors from the model,
then every LLM tensor read from the HF folder's shards (`engines/hf_weights.py`), replaced by the release's
`llm.*` tensors where it has them, with every LoRA merged per weight (W + scale B A, the formula PEFT applies),
cast to the checkpoint's dtype. `locpath export` then streams the decoder from that file (`export/streamed.py`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..engines.hf_weights import HFFolder, LoraAdapter, write_safetensors
from ..errors import CheckpointError
from .import_plan import ImportInputs, ImportPlan
from .keymap import Assignment, produce


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _adapters(opts, lora_src, release_lora, kmap, lora_file_factors, _kind) -> list[LoraAdapter]:
    """Every LoRA to merge, as torch-free adapters: a PEFT folder, a PEFT-named state dict, the release's."""
    out = []
    if lora_src is not None:
        if lora_src.kind == "peft-adapter":
            out.append(LoraAdapter.from_peft_folder(opts.lora))
        else:
            f = lora_file_factors(lora_src)
            out.append(LoraAdapter.from_tensors({f"{m}.lora_{ab}.weight": _np(t) for m, ab_t in f.items()
                                                 for ab, t in ab_t.items()}, opts.lora_alpha,
                                                source=str(lora_src.path)))
    if release_lora is not None:
        tensors = {}
        for a in release_lora.plan.assignments:
            if any(_kind(t) == "lora" for t in a.targets):
                for t, x in zip(a.targets, produce(a, release_lora.source.get)):
                    tensors[f"{t[len('llm.'):-len('.lora_A')]}.lora_{t[-1]}.weight"] = _np(x)
        alpha = opts.lora_alpha if opts.lora_alpha is not None else (kmap.lora_alpha if kmap else None)
        out.append(LoraAdapter.from_tensors(tensors, alpha, source=str(release_lora.source.path)))
    return out


@dataclass
class _LLMWeights:
    """Every LLM tensor as it is written: the release's where it has one, else the shards', with PEFT's wholesale
    module copies put in and every LoRA delta added."""

    hf: HFFolder
    replaced: dict[str, np.ndarray]
    adapters: list[LoraAdapter]

    def tensor(self, name: str) -> np.ndarray:
        w = self.replaced[name].copy() if name in self.replaced else self.hf.weights.array(name)
        for ad in self.adapters:
            if name in ad.replaced:  # PEFT modules_to_save: the adapter's own copy of the whole module
                w = ad.replaced[name].copy()
        for ad in self.adapters:
            d = ad.delta(name)
            if d is not None:
                w += d
        return w

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.replaced[name].shape if name in self.replaced else self.hf.weights.shape(name))


@dataclass
class _ReleaseTensors:
    """The release's tensors sorted out: `llm.*` ones kept (as arrays, by HF name) to replace the shards', adapter
    ones copied into the model's state; with the counts import.json records."""

    replaced: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    loaded: dict[str, int] = field(default_factory=dict)


def write_streamed_checkpoint(opts, inp: ImportInputs, plan: ImportPlan, t0: float, *, kind, lora_file_factors,
                              load_tile_encoder_weights, schema: str, log=print) -> dict:
    """Called by `importer.import_checkpoint` once everything is planned and checked; `kind` (a target's group),
    `lora_file_factors` and `load_tile_encoder_weights` are the importer's own helpers, passed in so the two
    modules do not import each other."""
    from ..models.llm import sync_llm_config

    cfg = plan.cfg
    dtype = {"auto": "bfloat16", "float32": "float32", "bfloat16": "bfloat16"}[opts.dtype]
    hf = HFFolder(opts.llm)
    model, llm, state, llm_names = _meta_llm_model(opts, cfg, hf)
    rel = _release_tensors(inp.files, state, kind)
    release_lora = [rf for rf in inp.files if rf.role in plan.checked["lora"]]
    adapters = _adapters(opts, inp.lora_src, release_lora[-1] if release_lora else None, inp.kmap, lora_file_factors,
                         kind)
    for ad in adapters:
        ad.check_against(hf)  # its warning lines were logged by the importer's own check, before this path
        log(f"import: LoRA {ad.source}: {len(ad.pairs)} weights, merged per tensor while writing"
            + (f"; replaced wholesale: {', '.join(sorted(ad.replaced_modules()))}" if ad.replaced else ""))
    weights = _LLMWeights(hf, rel.replaced, adapters)
    _apply_derived(inp.kmap, state, weights)
    encoder = None
    if opts.encoder_weights is not None:
        encoder = load_tile_encoder_weights(model, Path(opts.encoder_weights))
        state = model.state_dict()
    cfg.llm = sync_llm_config(cfg.llm, llm)
    tensors = _tensor_list(opts, state, llm_names, weights, "BF16" if dtype == "bfloat16" else "F32",
                           bool(cfg.llm.tie_word_embeddings))
    summary = _summary(opts, inp, plan, hf, dtype, rel, adapters, encoder, schema)
    log(f"import: writing {len(tensors)} tensors ({plan.llm_params / 1e9:.1f} B LLM parameters, {dtype}) one at a "
        "time")
    _write(Path(opts.out), cfg, tensors, inp, summary)
    for rf in inp.files:
        rf.source.close()
    summary["seconds"] = round(time.time() - t0, 1)
    log(f"import: checkpoint {opts.out} ({dtype}, streamed, CARA layers {list(cfg.cara.layers)}) in "
        f"{summary['seconds']} s")
    return summary


def _meta_llm_model(opts, cfg, hf: HFFolder):
    """The LocPathModel with its LLM on the meta device; (model, llm, state dict, the LLM's HF names). The shards
    may hold no tensor the model lacks."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models.slide_llm import LocPathModel

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(hf.hf_config())
    model = LocPathModel(cfg, llm=llm).eval()
    state = model.state_dict()
    llm_names = {k[len("llm."):] for k in state if k.startswith("llm.")}
    extra = sorted(set(hf.weights.names()) - llm_names)
    if extra:
        raise CheckpointError(f"{opts.llm}: tensors the {hf.model_type} model does not have: {extra[:4]}")
    return model, llm, state, llm_names


def _release_tensors(files: list, state: dict, _kind) -> _ReleaseTensors:
    import torch

    rel = _ReleaseTensors()
    with torch.no_grad():
        for rf in files:
            for a in rf.plan.assignments:
                kinds = {_kind(t) for t in a.targets}
                if kinds == {"llm"}:
                    for t, x in zip(a.targets, produce(a, rf.source.get)):
                        rel.replaced[t[len("llm."):]] = _np(x)
                        rel.counts[rf.role] = rel.counts.get(rf.role, 0) + 1
                elif kinds == {"adapter"}:
                    for t, x in zip(a.targets, produce(a, rf.source.get)):
                        state[t].copy_(x)
                        rel.loaded[rf.role] = rel.loaded.get(rf.role, 0) + 1
    return rel


def _apply_derived(kmap, state: dict, weights: _LLMWeights) -> None:
    """The key map's `from` rules, which may read the LLM's own tensors (a TIS on its embeddings)."""
    import torch

    def getter(k: str):
        return torch.from_numpy(weights.tensor(k[len("llm."):])) if k.startswith("llm.") else state[k]

    with torch.no_grad():
        for rule in (kmap.derived if kmap else []):
            for t, x in zip(rule.targets, produce(Assignment(rule, [rule.source], rule.targets), getter)):
                state[t].copy_(x)


def _tensor_list(opts, state: dict, llm_names: set[str], weights: _LLMWeights, st_dtype: str, tied: bool) -> list:
    """(name, dtype, shape, read) for every tensor of model.safetensors: the adapters', then the LLM's."""
    tensors = [(k, st_dtype, tuple(v.shape), (lambda v=v: _np(v))) for k, v in state.items()
               if not k.startswith("llm.")]
    for name in sorted(llm_names):
        if tied and name == "lm_head.weight":
            continue  # stored once, as the embedding
        if name not in weights.hf.weights and name not in weights.replaced:
            raise CheckpointError(f"{opts.llm}: the shards lack {name}")
        tensors.append(("llm." + name, st_dtype, weights.shape(name), (lambda n=name: weights.tensor(n))))
    return tensors


def _summary(opts, inp: ImportInputs, plan: ImportPlan, hf: HFFolder, dtype: str, rel: _ReleaseTensors,
             adapters: list[LoraAdapter], encoder: dict | None, schema: str) -> dict:
    """import.json of the streamed path."""
    cfg, kmap = plan.cfg, inp.kmap
    return {
        "schema": schema, "locpath_version": __version__, "checkpoint": str(opts.out), "streamed": True,
        "llm": {"folder": str(opts.llm), "model_type": hf.model_type, "parameters": plan.llm_params,
                "layers": hf.get("num_hidden_layers"), "hidden_size": hf.get("hidden_size"),
                "replaced_by_release": rel.counts},
        "dtype": dtype, "tokenizer": str(Path(opts.llm) / "tokenizer.json"), "chat_template": inp.template_from,
        "lora": [{"source": ad.source, "weights": len(ad.pairs), "alpha": ad.alpha if ad.alpha is not None else "rank",
                  "how": "merged per tensor while writing (W + scale B A)",
                  "replaced_modules": sorted(ad.replaced_modules())} for ad in adapters],
        "release": {rf.role: {"file": str(rf.source.path), "tensors": len(rf.source.infos),
                              "assignments": len(rf.plan.assignments), "ignored": len(rf.plan.ignored),
                              "adapter_tensors_loaded": rel.loaded.get(rf.role, 0)} for rf in inp.files},
        "key_map": {"file": kmap.path, "name": kmap.name} if kmap else None,
        "cara_layers": list(cfg.cara.layers),
        "random": plan.random_groups + (["(missing) " + m for m in plan.missing] if plan.missing else []),
        "tile_encoder": {"name": cfg.tile_encoder.name, "weights": encoder},
    }


def _write(out: Path, cfg, tensors: list, inp: ImportInputs, summary: dict) -> None:
    """The checkpoint folder, written atomically: config, model.safetensors tensor by tensor, tokenizer, template."""
    from ..fsutil import atomic_dir
    from ..models.checkpoint import FORMAT_VERSION

    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "model": cfg.to_dict()},
                                                    indent=2))
        summary["bytes"] = write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        inp.tok.save(str(tmp / "tokenizer.json"))
        (tmp / "chat_template.jinja").write_text(inp.template, encoding="utf-8")
        (tmp / "import.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
