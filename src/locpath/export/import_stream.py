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
from pathlib import Path

import numpy as np

from .. import __version__
from ..engines.hf_weights import HFFolder, LoraAdapter, write_safetensors
from ..errors import CheckpointError


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _adapters(opts, lora_src, release_lora, kmap, produce, lora_file_factors, _kind) -> list[LoraAdapter]:
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


def write_streamed_checkpoint(opts, cfg, tok, template: str, template_from: str, files: list, checked: dict,
                              kmap, lora_src, random_groups: list, missing: list, llm_params: int, t0: float, *,
                              kind, lora_file_factors, load_tile_encoder_weights, schema: str, log=print) -> dict:
    """Called by `importer.import_checkpoint` once everything is planned and checked; `kind` (a target's group),
    `lora_file_factors` and `load_tile_encoder_weights` are the importer's own helpers, passed in so the two
    modules do not import each other."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..fsutil import atomic_dir
    from ..models.checkpoint import FORMAT_VERSION
    from ..models.llm import sync_llm_config
    from ..models.slide_llm import LocPathModel
    from .keymap import Assignment, produce

    _kind, IMPORT_SCHEMA = kind, schema

    dtype = {"auto": "bfloat16", "float32": "float32", "bfloat16": "bfloat16"}[opts.dtype]
    st_dtype = "BF16" if dtype == "bfloat16" else "F32"
    hf = HFFolder(opts.llm)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(hf.hf_config())
    model = LocPathModel(cfg, llm=llm).eval()
    state = model.state_dict()
    llm_names = {k[len("llm."):] for k in state if k.startswith("llm.")}
    extra = sorted(set(hf.weights.names()) - llm_names)
    if extra:
        raise CheckpointError(f"{opts.llm}: tensors the {hf.model_type} model does not have: {extra[:4]}")

    replaced: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    loaded: dict[str, int] = {}
    with torch.no_grad():
        for rf in files:
            for a in rf.plan.assignments:
                kinds = {_kind(t) for t in a.targets}
                if kinds == {"llm"}:
                    for t, x in zip(a.targets, produce(a, rf.source.get)):
                        replaced[t[len("llm."):]] = _np(x)
                        counts[rf.role] = counts.get(rf.role, 0) + 1
                elif kinds == {"adapter"}:
                    for t, x in zip(a.targets, produce(a, rf.source.get)):
                        state[t].copy_(x)
                        loaded[rf.role] = loaded.get(rf.role, 0) + 1
    release_lora = [rf for rf in files if rf.role in checked["lora"]]
    adapters = _adapters(opts, lora_src, release_lora[-1] if release_lora else None, kmap, produce,
                         lora_file_factors, _kind)
    for ad in adapters:
        ad.check_against(hf)  # its warning lines were logged by the importer's own check, before this path
        log(f"import: LoRA {ad.source}: {len(ad.pairs)} weights, merged per tensor while writing"
            + (f"; replaced wholesale: {', '.join(sorted(ad.replaced_modules()))}" if ad.replaced else ""))

    def llm_tensor(name: str) -> np.ndarray:
        w = replaced[name].copy() if name in replaced else hf.weights.array(name)
        for ad in adapters:
            if name in ad.replaced:  # PEFT modules_to_save: the adapter's own copy of the whole module
                w = ad.replaced[name].copy()
        for ad in adapters:
            d = ad.delta(name)
            if d is not None:
                w += d
        return w

    def getter(k: str):  # `from` rules may read the LLM's own tensors (a TIS on its embeddings)
        return torch.from_numpy(llm_tensor(k[len("llm."):])) if k.startswith("llm.") else state[k]

    with torch.no_grad():
        for rule in (kmap.derived if kmap else []):
            for t, x in zip(rule.targets, produce(Assignment(rule, [rule.source], rule.targets), getter)):
                state[t].copy_(x)
    encoder = None
    if opts.encoder_weights is not None:
        encoder = load_tile_encoder_weights(model, Path(opts.encoder_weights))
        state = model.state_dict()
    cfg.llm = sync_llm_config(cfg.llm, llm)
    tied = bool(cfg.llm.tie_word_embeddings)
    tensors = [(k, st_dtype, tuple(v.shape), (lambda v=v: _np(v))) for k, v in state.items()
               if not k.startswith("llm.")]
    for name in sorted(llm_names):
        if tied and name == "lm_head.weight":
            continue  # stored once, as the embedding
        if name not in hf.weights and name not in replaced:
            raise CheckpointError(f"{opts.llm}: the shards lack {name}")
        shape = replaced[name].shape if name in replaced else hf.weights.shape(name)
        tensors.append(("llm." + name, st_dtype, tuple(shape), (lambda n=name: llm_tensor(n))))
    summary = {
        "schema": IMPORT_SCHEMA, "locpath_version": __version__, "checkpoint": str(opts.out), "streamed": True,
        "llm": {"folder": str(opts.llm), "model_type": hf.model_type, "parameters": llm_params,
                "layers": hf.get("num_hidden_layers"), "hidden_size": hf.get("hidden_size"),
                "replaced_by_release": counts},
        "dtype": dtype, "tokenizer": str(Path(opts.llm) / "tokenizer.json"), "chat_template": template_from,
        "lora": [{"source": ad.source, "weights": len(ad.pairs), "alpha": ad.alpha if ad.alpha is not None else "rank",
                  "how": "merged per tensor while writing (W + scale B A)",
                  "replaced_modules": sorted(ad.replaced_modules())} for ad in adapters],
        "release": {rf.role: {"file": str(rf.source.path), "tensors": len(rf.source.infos),
                              "assignments": len(rf.plan.assignments), "ignored": len(rf.plan.ignored),
                              "adapter_tensors_loaded": loaded.get(rf.role, 0)} for rf in files},
        "key_map": {"file": kmap.path, "name": kmap.name} if kmap else None,
        "cara_layers": list(cfg.cara.layers),
        "random": random_groups + (["(missing) " + m for m in missing] if missing else []),
        "tile_encoder": {"name": cfg.tile_encoder.name, "weights": encoder},
    }
    log(f"import: writing {len(tensors)} tensors ({llm_params / 1e9:.1f} B LLM parameters, {dtype}) one at a time")
    with atomic_dir(Path(opts.out)) as tmp:
        (tmp / "config.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "model": cfg.to_dict()},
                                                    indent=2))
        summary["bytes"] = write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        (tmp / "import.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    for rf in files:
        rf.source.close()
    summary["seconds"] = round(time.time() - t0, 1)
    log(f"import: checkpoint {opts.out} ({dtype}, streamed, CARA layers {list(cfg.cara.layers)}) in "
        f"{summary['seconds']} s")
    return summary
