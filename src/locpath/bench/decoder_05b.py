"""The decoder alone on a Qwen2.5-0.5B-shaped LLM (random weights, built locally: no hub), four ways in one
process: locpath's fused decoder graph with INT4 (GroupQueryAttention, shared K/V buffers, INT4 embedding
shared with the lm_head), locpath's plain exported decoder with INT4 MatMulNBits, onnxruntime-genai INT4 (its own
model builder, run on the same local Hugging Face folder, intra-op threads set), and transformers eager fp32. Greedy, batch 1,
a 64-token prompt then 64 new tokens; decode tokens/s excludes the prefill.

Everything is cached under the work folder (the HF folder, both ONNX models), so only the first run pays the
export and quantization (a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def _hf_folder(work: Path, log) -> Path:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from ..checkpoints import shipped_checkpoint

    folder = work / "qwen2.5-0.5b-shaped"
    if (folder / "config.json").exists():
        return folder
    log("building a random Qwen2.5-0.5B-shaped model (local, seeded)")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B))
    model.save_pretrained(folder)
    # any tokenizer serves: the comparison feeds token ids; the genai builder only copies it
    tok = PreTrainedTokenizerFast(tokenizer_file=str(shipped_checkpoint("reference") / "tokenizer.json"),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return folder


def _text_only_model(folder: Path):
    from ..config import LLMConfig, preset
    from ..models.slide_llm import LocPathModel

    cfg = preset("tiny")
    cfg.llm = LLMConfig(pretrained_path=str(folder))
    cfg.cara.layers = ()
    return LocPathModel(cfg).eval()


def _locpath_fused(model, folder: Path, work: Path, max_positions: int, log, block_sizes=(32, 128)):
    """The fused graph from the LLM's weights, INT4 the way `locpath build` makes it, per block size (cached);
    the weights are copied out of the model only when a variant is missing."""
    from ..engines.fused_graph import build_fused_decoder
    from ..export.fused import fused_spec, fused_weights

    out = work / "locpath-0.5b"
    spec = fused_spec(model, max_positions)
    paths = {b: out / ("decoder_fused.int4.onnx" if b == 32 else f"decoder_fused.int4-b{b}.onnx") for b in block_sizes}
    weights = None
    for b, int4 in paths.items():
        if not int4.exists():
            out.mkdir(parents=True, exist_ok=True)
            if weights is None:
                weights = fused_weights(model, spec)
            log(f"building the 0.5B-shaped fused decoder (INT4, block {b})")
            build_fused_decoder(spec, weights, int4, quant="int4", block_size=b, source=str(folder))
    return paths, spec.contract()


def _locpath_decoder(model, work: Path, log):
    """Our exporter on the same LLM (no CARA layers: the plain decoder), then our INT4 recipe."""
    from ..engines import quantize_ort as q
    from ..export.configs import decoder_config, plain_decoder_contract
    from ..export.exporter import export_component

    out = work / "locpath-0.5b"
    int4 = out / "decoder.int4.onnx"
    ec = decoder_config(model)
    if not int4.exists():
        out.mkdir(parents=True, exist_ok=True)
        log("exporting the 0.5B-shaped decoder with locpath's exporter")
        rep = export_component(ec, model, out)
        log("quantizing it to INT4 (MatMulNBits, tied lm_head folded)")
        q.decoder_int4(out / rep.file, int4)
    return int4, plain_decoder_contract(model)


def _genai_model(folder: Path, work: Path, threads: int, log, block_size: int = 32) -> Path | None:
    out = work / ("genai-0.5b-int4" if block_size == 32 else f"genai-0.5b-int4-b{block_size}")
    if not (out / "genai_config.json").exists():
        log(f"building the onnxruntime-genai INT4 model (block {block_size}) with its own builder")
        res = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
                              "-p", "int4", "-e", "cpu", "-c", str(work / f"genai-cache-b{block_size}"),
                              "--extra_options", f"block_size={block_size}"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"onnxruntime-genai builder failed: {res.stderr[-500:]}")
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    if so.get("intra_op_num_threads") != threads:
        so["intra_op_num_threads"] = threads  # its default threading runs 2-3x slow on small machines
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def _ours(int4: Path, contract, prompt: list[int], new: int, threads: int):
    """One timed generation with locpath's decoder state, spinning on as the Pipeline runs its decoder."""
    from ..runtime.decoder_state import decoder_state
    from ..runtime.ort_runner import OrtRunner

    st = decoder_state(OrtRunner(int4, "decoder", threads=threads, spin=True), contract)

    def run():
        cache = st.new_cache(1, len(prompt) + new + 1)
        t0 = time.perf_counter()
        logits = st.step(np.asarray([prompt]), cache, np.ones((1, len(prompt)), np.int64), {})
        t1 = time.perf_counter()
        toks = [int(logits[0, -1].argmax())]
        for _ in range(new - 1):
            logits = st.step(np.asarray([[toks[-1]]]), cache, np.ones((1, cache.length + 1), np.int64), {})
            toks.append(int(logits[0, -1].argmax()))
        return t1 - t0, time.perf_counter() - t1, new - 1, toks

    return run


def _genai(folder: Path, prompt: list[int], new: int):
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def run():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        gen.generate_next_token()  # samples the first token from the prefill's logits (runs no model)
        t1 = time.perf_counter()
        n = 0
        while not gen.is_done() and n < new - 1:  # each call: one model step on the last token, then a sample
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, n, [int(t) for t in gen.get_sequence(0)[len(prompt):]]

    return run


def _rounds(runs: dict, rounds: int = 3) -> dict:
    """Warm each engine up, then time them in alternating rounds so machine noise spreads over all of them."""
    for run in runs.values():
        run()
    got: dict = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            got[k].append(run())
    return {k: {"prefill_ms": 1000 * float(np.median([r[0] for r in v])),
                "tokens_per_s": float(np.median([r[2] / r[1] for r in v])),
                "tokens_per_s_runs": [round(r[2] / r[1], 2) for r in v], "tokens": v[-1][3]}
            for k, v in got.items()}


def _eager_tokens_per_s(folder: Path, prompt: list[int], new: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype="float32").eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        t1 = time.perf_counter()
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new):
            out = model(input_ids=tok, cache=cache, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    return {"prefill_ms": 1000 * (t1 - t0), "tokens_per_s": new / (t2 - t1)}


def bench_decoder_05b(work: Path, log, prompt_len: int = 64, new: int = 64) -> dict:
    threads = os.cpu_count() or 1
    work.mkdir(parents=True, exist_ok=True)
    folder = _hf_folder(work, log)
    prompt = [int(x) for x in np.random.default_rng(0).integers(100, 400, prompt_len)]
    model = _text_only_model(folder)
    fused_paths, fused_t = _locpath_fused(model, folder, work, 2048, log)
    fused, fused128 = fused_paths[32], fused_paths[128]
    int4, plain_t = _locpath_decoder(model, work, log)
    del model
    res: dict = {"shape": "Qwen2.5-0.5B (random weights)", "prompt_tokens": prompt_len, "new_tokens": new,
                 "threads": threads}
    runs = {"locpath_fused_int4": _ours(fused, fused_t, prompt, new, threads),
            "locpath_fused_int4_block128": _ours(fused128, fused_t, prompt, new, threads),
            "locpath_int4": _ours(int4, plain_t, prompt, new, threads)}
    try:
        import onnxruntime_genai  # noqa: F401

        runs["onnxruntime_genai_int4"] = _genai(_genai_model(folder, work, threads, log), prompt, new)
        runs["onnxruntime_genai_int4_block128"] = _genai(_genai_model(folder, work, threads, log, 128), prompt, new)
    except ImportError:
        res["onnxruntime_genai_int4"] = {"skipped": "onnxruntime-genai is not installed"}
    log(f"decoding with {', '.join(runs)} (alternating rounds)")
    res.update(_rounds(runs))
    for k, path in (("locpath_fused_int4", fused), ("locpath_fused_int4_block128", fused128), ("locpath_int4", int4)):
        res[k]["file_mb"] = round(path.stat().st_size / 1e6, 1)
    for k in runs:  # random weights give near-flat logits: token agreement between INT4 models says nothing here
        res[k].pop("tokens")
    log("decoding with transformers eager fp32")
    res["transformers_eager_fp32"] = _eager_tokens_per_s(folder, prompt, new)
    return res
