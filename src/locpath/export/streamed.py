"""A bundle whose decoder is written straight from a Hugging Face folder's safetensors shards: published scale
(Qwen2.5-7B and up) on a machine that cannot hold the float LLM.

The LLM is never built in memory: the LocPathModel that exports the other graphs (tile encoder, resampler, TIS,
cross-KV) carries its LLM on PyTorch's meta device (shapes only), and the fused decoder is written layer by layer
by `engines/fused_stream.py` from the shards, a LoRA adapter merged per weight, and the CARA blocks' weights.
There is no plain decoder graph in such a bundle (the fused graph runs on ONNX Runtime CPU and CUDA); its
parity with PyTorch is checked on reduced-depth models by `tests/test_published.py`.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from pathlib import Path

from ..bundle import names
from ..bundle.manifest import ComponentEntry, IOSpec
from ..bundle.paths import sha256_file
from ..config import LLMConfig, ModelConfig
from ..engines.fused_graph import build_fused_decoder
from ..engines.fused_stream import HFFusedWeights, spec_from_hf
from ..engines.hf_weights import HFFolder, LoraAdapter
from ..errors import CheckpointError, LocpathError
from ..fsutil import atomic_dir
from ..runtime.pipeline import peak_rss_mb
from ..text import CHAT_TEMPLATE
from .bundle import CHAT_TEMPLATE_FILE, export_graph, write_bundle_manifest
from .configs import vision_configs


def skeleton_model(cfg: ModelConfig, hf: HFFolder):
    """A LocPathModel at `cfg`'s sizes with the HF folder's LLM on the meta device: every part but the LLM is
    real (random until a state dict is loaded into it), the LLM takes no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models.llm import sync_llm_config
    from ..models.slide_llm import LocPathModel

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(hf.hf_config())
    cfg.llm = sync_llm_config(cfg.llm, llm)  # the folder's sizes, as a checkpoint records them
    return LocPathModel(cfg, llm=llm).eval()


class CheckpointLLM:
    """The LLM inside a locpath checkpoint's model.safetensors (its `llm.*` tensors), seen as `HFFolder` is: what
    `locpath export` streams the decoder from when the LLM is too large to build in memory. A tied embedding that
    safetensors stored once, as `lm_head.weight`, is read under both names."""

    def __init__(self, checkpoint: Path, cfg: ModelConfig):
        from ..engines.hf_weights import SafetensorsFiles
        from ..models.llm import hf_config

        weights = checkpoint / "model.safetensors"
        if not weights.is_file() or weights.is_symlink():
            raise CheckpointError(f"{checkpoint}: model.safetensors missing or not a regular file")
        self.folder, self.model_type = checkpoint, cfg.llm.architecture
        self.all = SafetensorsFiles([weights])
        self.weights = self.all.prefixed("llm.")
        self._hf = hf_config(cfg.llm)
        self.config = self._hf.to_dict()
        e = self.weights.entries
        if cfg.llm.tie_word_embeddings and "model.embed_tokens.weight" not in e and "lm_head.weight" in e:
            e["model.embed_tokens.weight"] = e.pop("lm_head.weight")

    def hf_config(self):
        return self._hf


def checkpoint_skeleton(checkpoint: Path):
    """(LocPathModel with its LLM on the meta device and every other tensor loaded from the checkpoint as
    float32, the checkpoint's LLM as a `CheckpointLLM`)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from ..models.checkpoint import read_config
    from ..models.slide_llm import LocPathModel

    cfg = read_config(checkpoint)
    if cfg.fusion != "cara":
        raise LocpathError(f"{checkpoint}: only LoC-Path (fusion 'cara') checkpoints export to a bundle")
    hf = CheckpointLLM(checkpoint, cfg)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(hf.hf_config())
    model = LocPathModel(cfg, llm=llm).eval()
    own = {}
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if not k.startswith("llm."):
                own[k] = f.get_tensor(k).float()
    missing, unexpected = model.load_state_dict(own, strict=False)
    missing = [k for k in missing if not k.startswith("llm.")]
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}/model.safetensors: does not match config.json (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model, hf


def hf_tokenizer(folder: Path) -> tuple[Path, str]:
    """The folder's tokenizer.json and chat template (chat_template.jinja, or tokenizer_config.json's
    `chat_template`; ChatML when it has none), checked for the ChatML special tokens the runtime stops on."""
    tok = folder / "tokenizer.json"
    if not tok.is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json (the runtime needs a fast tokenizer file)")
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "tokenizer_config.json").is_file():
        try:
            t = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise CheckpointError(f"{folder}/tokenizer_config.json: invalid JSON ({exc})") from None
        template = t if isinstance(t, str) else None
    from ..text import load_tokenizer

    load_tokenizer(tok)  # the special tokens
    return tok, template or CHAT_TEMPLATE


def current_rss_mb(pid: int | str = "self") -> float:
    """Resident set now (VmRSS) of a process: sampled while the decoder streams, it separates that phase's memory
    from the torch exports' before it, which the process-wide peak cannot; the bench's watchdog reads a child's."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def export_streamed_bundle(model, hf: HFFolder, out: str | os.PathLike, lora: LoraAdapter | None = None,
                           quant: str = "int4", block_size: int = 32, max_length: int = 2048,
                           tokenizer_dir: str | os.PathLike | None = None, validate: bool = True,
                           overwrite: bool = False, source: dict | None = None, share_tis_embedding: bool = True,
                           log=print) -> tuple[Path, dict]:
    """Write a bundle: the non-LLM graphs exported (and validated) from `model`, the fused decoder streamed from
    `hf` (+ `lora`) at `quant` ("int4" or "fp32"). A TIS whose table is the LLM's embedding matrix reads the
    decoder's embedding rows instead of carrying a copy (export/tis_shared.py; `share_tis_embedding=False` keeps
    the copy)."""
    import torch

    from . import tis_shared
    from .fused import cara_fused_weights

    out = Path(out)
    if out.exists() and not overwrite:
        raise LocpathError(f"{out}: already exists (pass --overwrite to replace it)")
    t_start = time.time()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = model.cfg
    max_length = min(int(max_length), cfg.llm.max_position_embeddings)
    tok_file, template = hf_tokenizer(Path(tokenizer_dir) if tokenizer_dir else hf.folder)
    cara_ids = list(model.cara.layer_ids)
    blk = model.cara.blocks[str(cara_ids[0])] if cara_ids else None
    spec = spec_from_hf(hf, max_length, cara_ids, cfg.cara.num_heads if cara_ids else 0,
                        blk.ffn.fc1.out_features if blk is not None else 0, float(blk.norm.eps) if blk else 1e-6)
    weights = HFFusedWeights(hf, spec, lora, cara_fused_weights(model, cara_ids))
    share = (share_tis_embedding and (quant != "int4" or spec.hidden % block_size == 0)
             and (lora is None or "model.embed_tokens.weight" not in {**lora.pairs, **lora.replaced}) and tis_shared.shares_llm_embedding(model, hf))
    if share:
        tis_shared.stand_in_table(model)
    report: dict = {"components": {}, "tis_embedding": "the decoder's (shared)" if share else "its own table"}
    with atomic_dir(out) as tmp:
        components: dict[str, ComponentEntry] = {}
        for ec in vision_configs(model):
            components[ec.component], rep = export_graph(ec, model, tmp, validate, max_length, log)
            report["components"][ec.component] = {"seconds": round(rep.seconds, 1), "max_abs_diff": rep.max_abs_diff}
        name = f"{names.DECODER_FUSED}.onnx" if quant == "fp32" else f"{names.DECODER_FUSED}.{quant}.onnx"
        gc.collect()
        before = current_rss_mb()
        t0, done, rss = time.time(), [0], {"before": before, "max": before}
        n_mat = 4 * spec.num_layers + 4 * len(cara_ids) + 2

        def progress(wname):
            done[0] += 1
            rss["max"] = max(rss["max"], current_rss_mb())
            if done[0] % max(1, n_mat // 10) == 0:
                log(f"export: decoder weights {done[0]}/{n_mat} ({time.time() - t0:.0f} s, RSS {current_rss_mb():.0f} MB)")

        info = build_fused_decoder(spec, weights, tmp / name, quant=quant, block_size=block_size,
                                   source=str(hf.folder), external=True if share else None, progress=progress)
        secs = time.time() - t0
        log(f"export: {names.DECODER_FUSED} ({quant}) streamed from {hf.folder} in {secs:.0f} s"
            + (f" (weights in {info['data_file']})" if info["data_file"] else ""))
        report["components"][names.DECODER_FUSED] = {
            "seconds": round(secs, 1), "quant": quant, "rss_before_mb": round(rss["before"]),
            "rss_max_while_streaming_mb": round(rss["max"]),
            "one_layer_fp32_mb": round(4 * spec.hidden * ((2 * spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
                                                          + 3 * spec.intermediate) / 2**20)}
        contract = spec.contract()
        components[names.DECODER_FUSED] = ComponentEntry(
            file=name, sha256=sha256_file(tmp / name), precision=quant, backend="onnxruntime",
            inputs=[IOSpec.from_decl(d) for d in contract.inputs()],
            outputs=[IOSpec.from_decl(d) for d in contract.outputs()], templates=spec.templates(),
            description="the decoder as ONNX Runtime contrib ops, written from the LLM's safetensors shards"
                        + (" with a LoRA adapter merged" if lora is not None else ""),
            profiles={}, quantization={k: v for k, v in info.items() if k not in ("ops",)},
            data_files=[info["data_file"]] if info["data_file"] else [])
        if share:
            _share_tis(components, tmp, name, info["data_file"], quant, block_size, spec.hidden)
        shutil.copyfile(tok_file, tmp / "tokenizer.json")
        (tmp / CHAT_TEMPLATE_FILE).write_text(template)
        write_bundle_manifest(
            tmp, cfg, components, max_length,
            source={"llm": str(hf.folder), "lora": lora.source if lora is not None else None, **(source or {})},
            export={"torch": torch.__version__, "exporter": "torch.onnx dynamo + locpath streamed fused decoder",
                    "seconds": round(time.time() - t_start, 1),
                    "validation": {k: v.get("max_abs_diff", {}) for k, v in report["components"].items()}})
    size = sum(p.stat().st_size for p in out.iterdir())
    report.update({"bundle": str(out), "seconds": round(time.time() - t_start, 1), "bytes": size,
                   "peak_rss_mb": round(peak_rss_mb())})
    log(f"export: bundle {out} ({size / 1e9:.2f} GB) in {report['seconds']} s, peak RSS {report['peak_rss_mb']} MB")
    return out, report


def _share_tis(components: dict, tmp: Path, decoder_file: str, data_file: str, quant: str, block: int,
               hidden: int) -> None:
    """Point the exported TIS graph at the decoder's embedding and list the decoder's data file as its own too."""
    import dataclasses

    from .tis_shared import point_at_decoder

    entry = components[names.TIS]
    point_at_decoder(tmp / entry.file, tmp / decoder_file, quant, block, hidden)
    for extra in entry.data_files:  # the stand-in table's export needs none; never leave one behind
        (tmp / extra).unlink(missing_ok=True)
    components[names.TIS] = dataclasses.replace(
        entry, sha256=sha256_file(tmp / entry.file), data_files=[data_file],
        description=entry.description + f"; questions embedded with the decoder's {quant} embedding rows (shared "
                                        f"from {data_file}, no copy)")


STREAM_ABOVE_PARAMS = 2_000_000_000  # LLMs above this are streamed by `locpath export` (fp32 would not fit 24 GB)


def llm_parameters(cfg: LLMConfig) -> int:
    """Parameters of a Qwen2/Llama LLM of these sizes (embeddings, layers, head)."""
    d, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd = d // cfg.num_attention_heads
    layer = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 3 * d * i + 2 * d
    return cfg.num_hidden_layers * layer + v * d * (1 if cfg.tie_word_embeddings else 2) + d


def export_checkpoint_streamed(checkpoint: str | os.PathLike, out: str | os.PathLike, quant: str = "int4",
                               block_size: int = 32, max_length: int = 2048, validate: bool = True,
                               overwrite: bool = False, log=print) -> tuple[Path, dict]:
    """`locpath export` for a checkpoint whose LLM is too large to build: the other graphs from the checkpoint's
    own tensors, the decoder streamed from its `llm.*` tensors (LoRA already merged by `locpath import`)."""
    checkpoint = Path(checkpoint)
    model, hf = checkpoint_skeleton(checkpoint)
    log(f"export: {checkpoint}: streaming the decoder ({quant}) from model.safetensors "
        f"({llm_parameters(model.cfg.llm) / 1e9:.1f} B LLM parameters)")
    return export_streamed_bundle(model, hf, out, quant=quant, block_size=block_size, max_length=max_length,
                                  tokenizer_dir=checkpoint, validate=validate, overwrite=overwrite,
                                  source={"checkpoint": str(checkpoint),
                                          "weights_sha256": sha256_file(checkpoint / "model.safetensors")},
                                  log=log)
