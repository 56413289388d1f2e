"""`locpath import`: a Hugging Face LLM folder (+ LoRA) and a release's state dicts -> a locpath checkpoint folder.

The order of work, so every name and shape problem is found before anything large is read:

1. the LLM folder: config.json (qwen2 or llama, default rope), tokenizer.json (with ChatML's special tokens) and
   its chat template (`chat_template.jinja`, else tokenizer_config.json's `chat_template`, else --chat-template);
2. the release files (mae, stage1, stage2, in that order; a later file's tensor replaces an earlier one's) are
   opened lazily (safetensors headers, mmap'd weights-only torch files) and planned with the key map: unmatched or
   ambiguous keys and targets filled twice are refused here;
3. the model config: the published preset, the key map's `config` ("$llm.<field>" from the folder's config.json),
   --encoder, --config, the LLM's sizes from the folder, CARA layers (--cara-layers, else those the release fills,
   else the preset's when they fit);
4. the whole model on the meta device (no memory): every planned tensor is transformed as meta to check its shape
   against the locpath tensor it fills, LoRA factors against their Linear, and the adapter tensors no file fills
   are named (resampler, TIS and CARA must all be filled; the MAE head is pretraining-only and may stay random);
5. then the real work: the LLM loaded (float32, or bfloat16 above 2 B parameters: see `choose_dtype`), `llm.*`
   tensors of the release put in, LoRA merged through peft (a PEFT adapter folder with `PeftModel.from_pretrained`,
   a state dict's A/B pairs with `get_peft_model` + `set_peft_model_state_dict`; both `merge_and_unload`), the
   LocPathModel built around that LLM, the release's adapter tensors loaded, `from` rules applied (a TIS on the
   LLM's own embeddings), tile-encoder weights loaded, and the checkpoint written atomically with the folder's
   tokenizer and chat template and an import.json that records every source.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..config import ModelConfig, preset
from ..engines.hf_weights import HFFolder, check_replaced, saved_module_keys
from ..engines.safetensors_header import check_folder, load_json, open_confined, pread_all
from ..errors import CheckpointError, ConfigError, LocpathError, warn
from ..text import ChatTemplate, load_tokenizer
from .inventory import TensorSource, open_source
from .import_plan import ImportInputs, ImportPlan, ReleaseFile
from .keymap import Assignment, KeyMap, load_keymap, produce

IMPORT_SCHEMA = "locpath-import/1"
MAX_TEMPLATE_BYTES = 1 << 20
RELEASE_FILES = ("mae", "stage1", "stage2")
REQUIRED_GROUPS = ("resampler.", "tis.", "cara.")  # an imported model needs every one of these tensors filled
OPTIONAL_GROUPS = ("mae_head.", "tile_encoder.")  # pretraining-only / loaded from --encoder-weights
BF16_ABOVE = 2_000_000_000  # LLM parameters above which `auto` writes the checkpoint in bfloat16
PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_(A|B)(?:\.[A-Za-z_]\w*)?\.weight")


@dataclass
class ImportOptions:
    llm: Path
    out: Path
    lora: Path | None = None
    lora_alpha: float | None = None
    release: dict[str, Path] = field(default_factory=dict)  # mae/stage1/stage2 -> file
    key_map: Path | None = None
    encoder: str | None = None
    encoder_weights: Path | None = None
    config: dict | None = None
    cara_layers: tuple[int, ...] | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16
    chat_template: Path | None = None
    allow_missing: bool = False
    overwrite: bool = False
    stream: str = "auto"  # auto | on | off: write the checkpoint tensor by tensor, never holding the LLM


def release_dir(folder: str | os.PathLike) -> dict[str, Path]:
    """mae.pth, stage1.pth, stage2.pth (or .safetensors) found in a release's checkpoints folder."""
    p = Path(folder)
    if not p.is_dir():
        raise CheckpointError(f"{p}: release folder not found")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    check_folder(p)
    out = {}
    for name in RELEASE_FILES:
        for suffix in (".pth", ".safetensors", ".bin", ".pt"):
            if (p / f"{name}{suffix}").is_file():
                out[name] = p / f"{name}{suffix}"
                break
    if not out:
        raise CheckpointError(f"{p}: no mae/stage1/stage2 .pth or .safetensors files")
    return out


# -- the LLM folder ---------------------------------------------------------------------------------------------
def read_llm_folder(folder: Path, template_file: Path | None) -> tuple[dict, object, str, str]:
    """(config.json, tokenizer, chat template text, where the template came from), checked."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: LLM folder not found")
    check_folder(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder}: not a Hugging Face model folder (no config.json)")
    hf = load_json(cfg_file, "model config", folder)
    if not isinstance(hf, dict) or hf.get("model_type") not in ("qwen2", "llama"):
        raise CheckpointError(f"{cfg_file}: model_type {hf.get('model_type') if isinstance(hf, dict) else None!r} "
                              "is not supported (qwen2 or llama)")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise CheckpointError(f"{cfg_file}: rope type {rope_type!r}: a locpath checkpoint records only rope_theta "
                              "(default rope); not supported by import yet")
    try:
        tok = load_tokenizer(folder)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (locpath prompts and stops with ChatML's <|im_start|>/<|im_end|>, pads with "
                              "<|endoftext|>: Qwen2/2.5 tokenizers have them)") from None
    if template_file is not None:
        text, where = _read_text(template_file), str(template_file)
    elif (folder / "chat_template.jinja").is_file():
        text, where = _read_text(folder / "chat_template.jinja", folder), str(folder / "chat_template.jinja")
    else:
        tc = folder / "tokenizer_config.json"
        text = None
        if tc.is_file():
            data = load_json(tc, "tokenizer config", folder)
            text = data.get("chat_template") if isinstance(data, dict) else None
            if isinstance(text, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
                text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if not isinstance(text, str) or not text:
            raise CheckpointError(f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json's "
                                  "chat_template); pass --chat-template FILE")
        where = f"{tc} (chat_template)"
    ChatTemplate(text, where)  # renders, or one line naming it
    return hf, tok, text, where


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _read_text(p: Path, folder: Path | None = None) -> str:
    """A chat template: a regular file (inside `folder` when given), at most MAX_TEMPLATE_BYTES, UTF-8."""
    fd = open_confined(p, folder)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_TEMPLATE_BYTES:
            raise CheckpointError(f"{p}: a chat template of {size} bytes, over the {MAX_TEMPLATE_BYTES}-byte limit")
        return pread_all(fd, size, 0, p).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    finally:
        os.close(fd)


def check_llm_weights(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """The LLM folder's safetensors (index, shards, headers) checked as the streamed import reads them, before
    transformers opens them by name: a shard outside the folder or a malformed header is one line here. Returns
    the weights' shapes (None for a folder without safetensors)."""
    if any((folder / n).exists() or (folder / n).is_symlink()
           for n in ("model.safetensors.index.json", "model.safetensors")):
        w = HFFolder(folder).weights
        w.close()
        return {k: e.shape for k, e in w.entries.items()}
    return None


def check_adapter_modules(src: TensorSource, base: dict[str, tuple[int, ...]], tied: bool) -> list[str]:
    """A PEFT adapter's modules_to_save: a warning line for each module it replaces wholesale (never silent), one
    error line for a replacement whose shape is not the base's; returns the modules, for import.json."""
    replaced: dict[str, dict[str, tuple]] = {}
    for k, w in saved_module_keys(src.meta, src.keys(), src.path / "adapter_config.json").items():
        replaced.setdefault(w.rsplit(".", 1)[0], {})[w] = src.infos[k].shape
    for line in check_replaced(replaced, base, tied, src.path):
        warn(line)
    return sorted(replaced)


# -- config -------------------------------------------------------------------------------------------------------
def _merge(base: dict, over: dict, where: str, path: str = "") -> dict:
    out = dict(base)
    for k, v in over.items():
        if k not in base:
            raise ConfigError(f"{where}: unknown config field {path + k!r}")
        out[k] = _merge(base[k], v, where, f"{path}{k}.") if isinstance(base[k], dict) and isinstance(v, dict) else v
    return out


def _resolve(value, hf: dict, where: str):
    if isinstance(value, dict):
        return {k: _resolve(v, hf, where) for k, v in value.items()}
    if isinstance(value, str) and value.startswith("$llm."):
        name = value[len("$llm."):]
        if not isinstance(hf.get(name), (int, float)) or isinstance(hf.get(name), bool):
            raise ConfigError(f"{where}: {value}: the LLM's config.json has no number {name!r}")
        return hf[name]
    return value


def llm_config(hf_model_config):
    from ..models.llm import sync_llm_config

    class _Holder:
        config = hf_model_config

    return sync_llm_config(None, _Holder())


def build_config(opts: ImportOptions, hf: dict, kmap: KeyMap | None, filled: set[str]) -> ModelConfig:
    from transformers import AutoConfig

    base = preset("published").to_dict()
    if kmap is not None and kmap.config:
        base = _merge(base, _resolve(kmap.config, hf, f"key map {kmap.path}"), f"key map {kmap.path}")
    if opts.encoder:
        base["tile_encoder"] = _encoder_config(opts.encoder)
    if opts.config:
        base = _merge(base, opts.config, "--config")
    try:
        hf_cfg = AutoConfig.from_pretrained(str(opts.llm), local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"{opts.llm}: cannot read config.json ({_line(exc)})") from None
    import dataclasses

    base["llm"] = dataclasses.asdict(llm_config(hf_cfg))
    layers = _cara_layers(opts, filled, base, hf)
    base["cara"]["layers"] = list(layers)
    try:
        return ModelConfig.from_dict(base)
    except ConfigError as exc:
        raise ConfigError(f"model config for import: {exc}") from None


def _cara_layers(opts: ImportOptions, filled: set[str], base: dict, hf: dict) -> tuple[int, ...]:
    depth = int(hf.get("num_hidden_layers", 0))
    if opts.cara_layers:
        layers, why = tuple(opts.cara_layers), "--cara-layers"
    else:
        found = sorted({int(m.group(1)) for t in filled if (m := re.match(r"cara\.blocks\.(\d+)\.", t))})
        layers, why = (tuple(found), "the release's CARA blocks") if found else \
            (tuple(base["cara"]["layers"]), "the preset's CARA layers")
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ConfigError(f"CARA layers {list(layers)} ({why}) do not fit the LLM's {depth} layers "
                          f"({opts.llm / 'config.json'}); pass --cara-layers")
    return layers


def _encoder_config(name: str) -> dict:
    """TileEncoderConfig of a registered encoder (TRIDENT name), from models/encoders.py's registry builder."""
    import dataclasses

    from ..models.encoders import encoder_config

    return dataclasses.asdict(encoder_config(name))


def load_tile_encoder_weights(model, path: Path) -> dict:
    """The tile encoder's weights from a local file, through models/encoders.py's strict loader (timm names,
    registry prefixes, CONCH's unused towers dropped, fp16 cast)."""
    from ..models.encoders import load_encoder_weights

    info = load_encoder_weights(model.tile_encoder, path) or {}
    return {"file": str(path), "loaded": info.get("loaded"), "ignored": len(info.get("ignored", [])),
            "cast_from": sorted(info.get("cast_from", []))}


# -- memory -------------------------------------------------------------------------------------------------------
def available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose_dtype(requested: str, llm_params: int, total_params: int, folder: Path) -> str:
    """auto: float32 up to 2 B LLM parameters (what the reduced-depth models and tests use), bfloat16 above (a
    7B in float32 is ~30 GB: no 24 GB machine holds it). The model is held once and serialised once more by
    safetensors (a second copy of every tensor while model.safetensors is written), so the need is about 2.2x the
    weights (a Qwen2.5-7B import in bfloat16: ~37 GB); where that is more than the memory available the import is
    refused with the need named, before anything is loaded."""
    if requested not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"--dtype must be auto, float32 or bfloat16, not {requested!r}")
    dtype = requested if requested != "auto" else ("float32" if llm_params <= BF16_ABOVE else "bfloat16")
    need = int(total_params * (4 if dtype == "float32" else 2) * 2.2)
    have = available_bytes()
    if have is not None and need > have:
        raise LocpathError(f"{folder}: importing {total_params / 1e9:.1f} B parameters in {dtype} needs about "
                           f"{need / 2**30:.1f} GiB of memory (the weights and safetensors' copy while saving); "
                           f"{have / 2**30:.1f} GiB is available"
                           + (" (try --dtype bfloat16)" if dtype == "float32" else
                              "; a 7B-scale INT4 bundle can be streamed from the shards instead"))
    return dtype


# -- planning -----------------------------------------------------------------------------------------------------
def _kind(target: str) -> str:
    if target.startswith("llm.") and target.endswith((".lora_A", ".lora_B")):
        return "lora"
    if target.startswith("llm."):
        return "llm"
    return "adapter"


def _meta_tensor(info):
    import torch

    return torch.empty(info.shape, dtype=getattr(torch, info.dtype), device="meta")


def check_plans(files: list[ReleaseFile], kmap: KeyMap | None, meta_model) -> dict:
    """Shapes of every planned tensor (on meta) against the locpath model, LoRA factors against their Linear, the
    targets of `from` rules; returns {"filled": {target: file}, "lora": {file: {module: rank}}}."""
    import torch

    own = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    filled: dict[str, str] = {}
    lora: dict[str, dict[str, dict[str, tuple]]] = {}
    for rf in files:
        get = lambda k, s=rf.source: _meta_tensor(s.infos[k])  # noqa: E731
        factors: dict[str, dict[str, tuple]] = {}
        for a in rf.plan.assignments:
            outs = produce(a, get)
            for t, x in zip(a.targets, outs):
                kind = _kind(t)
                if kind == "lora":
                    module, ab = t[len("llm."):-len(".lora_A")], t[-1]
                    factors.setdefault(module, {})[ab] = tuple(x.shape)
                    continue
                if t not in own:
                    hint = " (is the config's depth right? see --config)" if re.search(r"\.\d+\.", t) else ""
                    raise CheckpointError(f"{rf.plan.label}: {a.sources[0]} -> {t}: not a tensor of the locpath "
                                          f"model ({a.rule.label()} of {kmap.path if kmap else 'the key map'}){hint}")
                if tuple(x.shape) != own[t]:
                    raise CheckpointError(f"{rf.plan.label}: {a.sources[0]} -> {t}: shape {list(x.shape)} after "
                                          f"{a.rule.label()}, the locpath model's is {list(own[t])}")
                filled[t] = rf.role
        if factors:
            lora[rf.role] = _check_factors(factors, meta_model.llm, rf.plan.label)
    for rule in (kmap.derived if kmap else []):
        for t in rule.targets:
            if t not in own or rule.source not in own:
                bad = t if t not in own else rule.source
                raise CheckpointError(f"key map {kmap.path}: {rule.label()}: {bad} is not a tensor of the locpath model")
            x = produce(Assignment(rule, [rule.source], rule.targets),
                        lambda k: torch.empty(own[k], device="meta"))[rule.targets.index(t)]
            if tuple(x.shape) != own[t]:
                raise CheckpointError(f"key map {kmap.path}: {rule.label()}: {rule.source} {list(own[rule.source])} "
                                      f"gives {list(x.shape)} for {t}, the locpath model's is {list(own[t])} (a TIS "
                                      "on the LLM's embeddings needs tis.question_dim = the LLM's hidden size)")
            filled[t] = "from " + rule.source
    return {"filled": filled, "lora": lora}


def _check_factors(factors: dict[str, dict[str, tuple]], llm, label: str) -> dict[str, int]:
    from torch import nn

    ranks = {}
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{label}: LoRA for {module} has only lora_{''.join(ab)} (needs A and B)")
        try:
            lin = llm.get_submodule(module)
        except AttributeError:
            raise CheckpointError(f"{label}: LoRA for {module}: the LLM has no such module") from None
        if not isinstance(lin, nn.Linear):
            raise CheckpointError(f"{label}: LoRA for {module}: a {type(lin).__name__}, not a Linear")
        a, b = ab["A"], ab["B"]
        if len(a) != 2 or len(b) != 2 or a[1] != lin.in_features or b[0] != lin.out_features or a[0] != b[1]:
            raise CheckpointError(f"{label}: LoRA for {module}: A {list(a)} and B {list(b)} do not fit its Linear "
                                  f"({lin.in_features} -> {lin.out_features}): A must be [r, {lin.in_features}], "
                                  f"B [{lin.out_features}, r]")
        ranks[module] = a[0]
    return ranks


# -- LoRA ---------------------------------------------------------------------------------------------------------
def merge_lora(llm, factors: dict[str, dict[str, object]], alpha: float | None, label: str):
    """Merge LoRA factors {module: {"A": [r, in], "B": [out, r]}} into the LLM through peft: a LoraConfig with
    exactly these modules (per-module ranks through rank_pattern), get_peft_model, set_peft_model_state_dict,
    merge_and_unload. alpha None means alpha = rank (scale 1). Returns (the plain LLM, facts)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    ranks = {m: int(f["A"].shape[0]) for m, f in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(m): rk for m, rk in ranks.items() if rk != r}
    alpha_pattern = {re.escape(m): float(rk) for m, rk in ranks.items() if rk != r} if alpha is None else {}
    cfg = LoraConfig(r=r, lora_alpha=float(alpha if alpha is not None else r), target_modules=sorted(ranks),
                     lora_dropout=0.0, bias="none", rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    dtype = next(llm.parameters()).dtype
    try:
        pm = get_peft_model(llm, cfg)
        sd = {f"base_model.model.{m}.lora_{ab}.weight": t.to(dtype) for m, f in factors.items() for ab, t in f.items()}
        res = set_peft_model_state_dict(pm, sd)
        if getattr(res, "unexpected_keys", None):
            raise CheckpointError(f"{label}: peft did not place LoRA tensors {list(res.unexpected_keys)[:3]}")
        merged = pm.merge_and_unload(safe_merge=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{label}: merging LoRA through peft failed ({type(exc).__name__}: "
                              f"{_line(exc)})") from None
    return merged, {"source": label, "modules": len(ranks), "rank": r, "ranks": sorted(set(ranks.values())),
                    "alpha": float(alpha) if alpha is not None else "rank", "how": "peft get_peft_model + merge"}


def merge_peft_folder(llm, folder: Path):
    from peft import PeftModel

    meta = load_json(folder / "adapter_config.json", "adapter config", folder)
    if not isinstance(meta, dict) or meta.get("peft_type") != "LORA":
        meta = meta if isinstance(meta, dict) else {}
        raise CheckpointError(f"{folder}: a {meta.get('peft_type')!r} adapter; only LoRA adapters merge")
    try:
        pm = PeftModel.from_pretrained(llm, str(folder), is_trainable=False, local_files_only=True)
        merged = pm.merge_and_unload(safe_merge=True)
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot merge the PEFT adapter ({type(exc).__name__}: "
                              f"{_line(exc)})") from None
    return merged, {"source": str(folder), "how": "peft PeftModel.from_pretrained + merge_and_unload",
                    "rank": meta.get("r"), "alpha": meta.get("lora_alpha"),
                    "target_modules": meta.get("target_modules")}


def lora_file_factors(src: TensorSource) -> dict[str, dict[str, object]]:
    """A PEFT-named LoRA state dict (`[base_model.model.]<module>.lora_A[.<adapter>].weight`) -> factors."""
    bad = [k for k in src.keys() if not PEFT_KEY.fullmatch(k)]
    if bad:
        raise CheckpointError(f"{src.path}: {len(bad)} keys are not LoRA factors "
                              f"(<module>.lora_A/B.weight): {bad[:3]}")
    out: dict[str, dict[str, object]] = {}
    for k in src.keys():
        m = PEFT_KEY.fullmatch(k)
        out.setdefault(m.group(1), {})[m.group(2)] = src.get(k)
    return out


# -- the import ---------------------------------------------------------------------------------------------------
def import_checkpoint(opts: ImportOptions, log=print) -> dict:
    t0 = time.time()
    out = Path(opts.out)
    if out.exists() and not opts.overwrite:
        raise LocpathError(f"{out}: already exists (pass --overwrite to replace it)")
    inp = read_inputs(opts, log)
    try:
        import torch  # noqa: F401 (imported once the files are checked: a bad file is refused in well under a second)
    except ImportError as exc:
        raise LocpathError(f"import needs the training extra (pip install 'locpath[train]'): {exc}") from None
    plan = plan_model(opts, inp)
    if opts.stream not in ("auto", "on", "off"):
        raise ConfigError(f"--stream must be auto, on or off, not {opts.stream!r}")
    if opts.stream == "on" or (opts.stream == "auto" and plan.llm_params > BF16_ABOVE):
        from .import_stream import write_streamed_checkpoint

        return write_streamed_checkpoint(opts, inp, plan, t0, kind=_kind, lora_file_factors=lora_file_factors,
                                         load_tile_encoder_weights=load_tile_encoder_weights, schema=IMPORT_SCHEMA,
                                         log=log)
    dtype = choose_dtype(opts.dtype, plan.llm_params, plan.total_params, Path(opts.llm))
    return _import_in_memory(opts, inp, plan, dtype, t0, log)


def read_inputs(opts: ImportOptions, log=print) -> ImportInputs:
    """Steps 1 and 2: the key map, the LLM folder, the release files opened and planned, the LoRA source."""
    kmap = load_keymap(opts.key_map) if opts.release or opts.key_map else None
    hf, tok, template, template_from = read_llm_folder(Path(opts.llm), opts.chat_template)
    llm_shapes = check_llm_weights(Path(opts.llm))
    files: list[ReleaseFile] = []
    for role in RELEASE_FILES:
        if role in opts.release:
            src = open_source(opts.release[role])
            files.append(ReleaseFile(role, src, kmap.plan(src.keys(), f"{src.path}")))
            log(f"import: {src.path}: {len(src.infos)} tensors, {len(files[-1].plan.assignments)} mapped "
                f"assignments, {len(files[-1].plan.ignored)} ignored")
    lora_src = None
    if opts.lora is not None:
        if Path(opts.lora).is_dir():
            check_folder(Path(opts.lora))
        lora_src = open_source(opts.lora)
    replaced_modules: list[str] = []
    if lora_src is not None and lora_src.kind == "peft-adapter" and llm_shapes is not None:  # before torch loads
        replaced_modules = check_adapter_modules(lora_src, llm_shapes, bool(hf.get("tie_word_embeddings", False)))
    return ImportInputs(kmap, hf, tok, template, template_from, llm_shapes, files, lora_src, replaced_modules)


def plan_model(opts: ImportOptions, inp: ImportInputs) -> ImportPlan:
    """Steps 3 and 4: the model config, then the whole model on the meta device to check every planned tensor."""
    import torch

    from ..models.slide_llm import LocPathModel

    planned = {t for rf in inp.files for a in rf.plan.assignments for t in a.targets}
    cfg = build_config(opts, inp.hf, inp.kmap, planned)
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))
    with torch.device("meta"):
        meta = LocPathModel(cfg)
    checked = check_plans(inp.files, inp.kmap, meta)
    missing, random_groups = _unfilled(opts, inp.files, meta.state_dict(), checked)
    lora_src = inp.lora_src
    if lora_src is not None and lora_src.kind == "peft-adapter" and inp.llm_shapes is None:  # a .bin LLM folder
        base = {k: tuple(v.shape) for k, v in meta.llm.state_dict().items()}
        inp.replaced_modules = check_adapter_modules(lora_src, base, bool(cfg.llm.tie_word_embeddings))
    if lora_src is not None and lora_src.kind != "peft-adapter":
        _check_factors({m: {ab: tuple(t.shape) for ab, t in f.items()} for m, f in lora_file_factors(lora_src).items()},
                       meta.llm, str(lora_src.path))
    return ImportPlan(cfg, checked, missing, random_groups, llm_params=sum(p.numel() for p in meta.llm.parameters()),
                      total_params=sum(p.numel() for p in meta.parameters()))


def _unfilled(opts: ImportOptions, files: list[ReleaseFile], own: dict, checked: dict) -> tuple[list, list]:
    """(the required tensors no file fills, refused unless --allow-missing; the optional groups left random)."""
    missing = [k for k in own if k.startswith(REQUIRED_GROUPS) and k not in checked["filled"]]
    random_groups = sorted({k.split(".")[0] for k in own if k.startswith(OPTIONAL_GROUPS)
                            and k not in checked["filled"]})
    if opts.encoder_weights is not None and "tile_encoder" in random_groups:
        random_groups.remove("tile_encoder")
    if missing and not opts.allow_missing:
        where = ", ".join(str(rf.source.path) for rf in files) or "no release files given"
        raise CheckpointError(f"{len(missing)} locpath tensors are filled by no release file ({where}) and no "
                              f"`from` rule: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} "
                              "(check the key map, or --allow-missing to keep them random)")
    return missing, random_groups


# -- the real work (in memory) -------------------------------------------------------------------------------------
def _import_in_memory(opts: ImportOptions, inp: ImportInputs, plan: ImportPlan, dtype: str, t0: float, log) -> dict:
    """Step 5: the LLM loaded, release tensors put in, LoRA merged, the LocPathModel filled and saved."""
    import torch

    from ..models.checkpoint import save_checkpoint  # writes atomically (fsutil.atomic_dir)
    from ..models.slide_llm import LocPathModel

    tdtype = getattr(torch, dtype)
    llm = _load_llm(opts, plan.llm_params, dtype, tdtype, log)
    replaced = _put_llm_tensors(llm, inp.files)
    llm, loras = _merge_loras(llm, opts, inp, plan, log)
    model = LocPathModel(plan.cfg, llm=llm)
    loaded = _put_adapter_tensors(model, inp)
    encoder = None
    if opts.encoder_weights is not None:
        encoder = load_tile_encoder_weights(model, Path(opts.encoder_weights))
    model = model.to(tdtype).eval()
    model.chat_template = ChatTemplate(inp.template, inp.template_from)
    summary = _summary(opts, inp, plan, dtype, replaced, loras, loaded, encoder)
    for g in plan.random_groups:
        log(f"import: {g}: random weights ({'pretraining only, not exported' if g == 'mae_head' else 'pass --encoder-weights'})")
    out = Path(opts.out)
    save_checkpoint(model, inp.tok, out, chat_template=inp.template,
                    extra_files={"import.json": json.dumps(summary, indent=2)})
    for rf in inp.files:
        rf.source.close()
    summary["seconds"] = round(time.time() - t0, 1)
    log(f"import: checkpoint {out} ({dtype}, CARA layers {list(plan.cfg.cara.layers)}) in {summary['seconds']} s")
    return summary


def _load_llm(opts: ImportOptions, llm_params: int, dtype: str, tdtype, log):
    from transformers import AutoModelForCausalLM

    log(f"import: loading {opts.llm} ({llm_params / 1e6:.1f} M parameters, {dtype})")
    try:
        llm = AutoModelForCausalLM.from_pretrained(str(opts.llm), local_files_only=True, dtype=tdtype)
    except Exception as exc:
        raise CheckpointError(f"{opts.llm}: cannot load the LLM ({type(exc).__name__}: "
                              f"{_line(exc)})") from None
    llm.eval()
    return llm


def _put_llm_tensors(llm, files: list[ReleaseFile]) -> Counter:
    """The release's `llm.*` tensors copied over the folder's; returns how many each file replaced."""
    import torch

    llm_state = llm.state_dict()
    replaced = Counter()
    with torch.no_grad():
        for rf in files:
            for a in rf.plan.assignments:
                if not any(_kind(t) == "llm" for t in a.targets):
                    continue
                for t, x in zip(a.targets, produce(a, rf.source.get)):
                    llm_state[t[len("llm."):]].copy_(x)
                    replaced[rf.role] += 1
    return replaced


def _merge_loras(llm, opts: ImportOptions, inp: ImportInputs, plan: ImportPlan, log) -> tuple[object, list[dict]]:
    """--lora (a PEFT folder or a PEFT-named state dict), then the release's own LoRA factors, merged into the LLM."""
    loras = []
    lora_src = inp.lora_src
    if lora_src is not None:
        if lora_src.kind == "peft-adapter":
            llm, info = merge_peft_folder(llm, Path(opts.lora))
            info["replaced_modules"] = inp.replaced_modules
        else:
            llm, info = merge_lora(llm, lora_file_factors(lora_src), opts.lora_alpha, str(lora_src.path))
        loras.append(info)
        log(f"import: merged LoRA {info['source']} (rank {info['rank']}, alpha {info['alpha']})"
            + (f"; replaced wholesale: {', '.join(info['replaced_modules'])}" if info.get("replaced_modules") else ""))
    release_lora = [rf for rf in inp.files if rf.role in plan.checked["lora"]]
    if release_lora:
        rf = release_lora[-1]  # a later stage's LoRA is the one trained last
        factors: dict[str, dict[str, object]] = {}
        for a in rf.plan.assignments:
            if any(_kind(t) == "lora" for t in a.targets):
                for t, x in zip(a.targets, produce(a, rf.source.get)):
                    factors.setdefault(t[len("llm."):-len(".lora_A")], {})[t[-1]] = x
        kmap = inp.kmap
        alpha = opts.lora_alpha if opts.lora_alpha is not None else (kmap.lora_alpha if kmap else None)
        llm, info = merge_lora(llm, factors, alpha, str(rf.source.path))
        loras.append(info)
        log(f"import: merged LoRA from {rf.source.path} ({info['modules']} modules, rank {info['rank']}, "
            f"alpha {info['alpha']})")
    return llm, loras


def _put_adapter_tensors(model, inp: ImportInputs) -> Counter:
    """The release's adapter tensors (resampler, TIS, CARA, ...) and the key map's `from` rules put into the model;
    returns how many each file loaded."""
    import torch

    state = model.state_dict()
    loaded = Counter()
    with torch.no_grad():
        for rf in inp.files:
            for a in rf.plan.assignments:
                if not all(_kind(t) == "adapter" for t in a.targets):
                    continue
                for t, x in zip(a.targets, produce(a, rf.source.get)):
                    state[t].copy_(x)
                    loaded[rf.role] += 1
        for rule in (inp.kmap.derived if inp.kmap else []):
            for t, x in zip(rule.targets, produce(Assignment(rule, [rule.source], rule.targets), lambda k: state[k])):
                state[t].copy_(x)
    return loaded


def _summary(opts: ImportOptions, inp: ImportInputs, plan: ImportPlan, dtype: str, replaced: Counter,
             loras: list[dict], loaded: Counter, encoder: dict | None) -> dict:
    """import.json of the in-memory path."""
    hf, kmap, files, cfg = inp.hf, inp.kmap, inp.files, plan.cfg
    return {
        "schema": IMPORT_SCHEMA, "locpath_version": __version__, "checkpoint": str(Path(opts.out)),
        "llm": {"folder": str(opts.llm), "model_type": hf.get("model_type"), "parameters": plan.llm_params,
                "layers": hf.get("num_hidden_layers"), "hidden_size": hf.get("hidden_size"),
                "replaced_by_release": dict(replaced)},
        "dtype": dtype, "tokenizer": str(Path(opts.llm) / "tokenizer.json"), "chat_template": inp.template_from,
        "lora": loras,
        "release": {rf.role: {"file": str(rf.source.path), "tensors": len(rf.source.infos),
                              "assignments": len(rf.plan.assignments), "ignored": len(rf.plan.ignored),
                              "adapter_tensors_loaded": loaded[rf.role]} for rf in files},
        "key_map": {"file": kmap.path, "name": kmap.name} if kmap else None,
        "derived": [f"{r.targets[0]} <- {r.source}" for r in (kmap.derived if kmap else [])],
        "cara_layers": list(cfg.cara.layers), "random": plan.random_groups + (["(missing) " + m for m in plan.missing]
                                                                              if plan.missing else []),
        "tile_encoder": {"name": cfg.tile_encoder.name, "weights": encoder},
    }
