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


class _FusedWeights:
    """The fused graph's named weights, copied out of the model only when a cached graph is missing."""

    def __init__(self, model, max_positions: int):
        from ..export.fused import fused_spec

        self.model, self.spec, self._w = model, fused_spec(model, max_positions), None

    def get(self) -> dict:
        from ..export.fused import fused_weights

        if self._w is None:
            self._w = fused_weights(self.model, self.spec)
        return self._w


def _locpath_fused(fw: _FusedWeights, folder: Path, work: Path, log, block_sizes=(32, 128)):
    """The fused graph from the LLM's weights, INT4 the way `locpath build` makes it, per block size (cached)."""
    from ..engines.fused_graph import build_fused_decoder

    out = work / "locpath-0.5b"
    paths = {b: out / ("decoder_fused.int4.onnx" if b == 32 else f"decoder_fused.int4-b{b}.onnx") for b in block_sizes}
    for b, int4 in paths.items():
        if not int4.exists():
            out.mkdir(parents=True, exist_ok=True)
            log(f"building the 0.5B-shaped fused decoder (INT4, block {b})")
            build_fused_decoder(fw.spec, fw.get(), int4, quant="int4", block_size=b, source=str(folder))
    return paths, fw.spec.contract()


PREFILL_RECIPES = (("int8", 32), ("int8-nbits", 128))


def _locpath_prefill(fw: _FusedWeights, folder: Path, work: Path, log) -> dict:
    """The prefill graph candidates (engines/prefill.py), cached: name -> path."""
    from ..engines.prefill import PrefillRecipe, build_prefill_decoder

    out = work / "locpath-0.5b"
    paths = {}
    for weights, block in PREFILL_RECIPES:
        r = PrefillRecipe(weights, block)
        path = out / f"decoder_fused_prefill.{r.name}.onnx"
        if not path.exists():
            out.mkdir(parents=True, exist_ok=True)
            log(f"building the 0.5B-shaped prefill graph ({r.name})")
            build_prefill_decoder(fw.spec, fw.get(), path, r, source=str(folder))
        paths[r.name] = path
    return paths


def _reference_logits(model, prompt: list[int]) -> np.ndarray:
    """fp32 PyTorch logits of the prompt's last position: what every prefill graph is compared with."""
    import torch

    with torch.no_grad():
        return model.llm(input_ids=torch.tensor([prompt])).logits[0, -1].float().numpy()


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of a graph's initializers (inside or external), rotary caches excluded: what one decode step reads
    at most (a tied INT4 vocabulary matrix counts once: embedding and lm_head share it)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in m.graph.initializer:
        if "cos_cache" in t.name or "sin_cache" in t.name:
            continue
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def _prefill_candidates(paths: dict, contract, prompt: list[int], threads: int, ref: np.ndarray, rounds: int = 5) -> dict:
    """64-token prefill of each graph alone, in alternating rounds, with its last logits against fp32 PyTorch."""
    from ..runtime.decoder_state import decoder_state
    from ..runtime.ort_runner import OrtRunner

    states = {k: decoder_state(OrtRunner(p, k, threads=threads, spin=True), contract) for k, p in paths.items()}
    mask = np.ones((1, len(prompt)), np.int64)
    ids = np.asarray([prompt])
    times: dict = {k: [] for k in states}
    logits: dict = {}
    for r in range(rounds + 1):
        for k, st in states.items():
            cache = st.new_cache(1, len(prompt) + 1)
            t0 = time.perf_counter()
            out = st.step(ids, cache, mask, {})
            if r:  # the first round warms up
                times[k].append(time.perf_counter() - t0)
            logits[k] = out[0, -1].astype(np.float64)
    res = {}
    for k in states:
        a = logits[k]
        res[k] = {"prefill_ms": round(1000 * float(np.median(times[k])), 2),
                  "cosine_vs_fp32": float(a @ ref / (np.linalg.norm(a) * np.linalg.norm(ref))),
                  "max_abs_vs_fp32": float(np.abs(a - ref).max()), "top1_as_fp32": int(a.argmax()) == int(ref.argmax())}
    for st in states.values():
        st.runner.release()
    return res


def choose_prefill(cands: dict, baseline: str) -> str:
    """The fastest prefill graph whose last logits are at least as close to fp32 as the decode graph's own
    (`baseline`, which always qualifies)."""
    floor = cands[baseline]["cosine_vs_fp32"]
    ok = {k: v for k, v in cands.items() if v["cosine_vs_fp32"] >= floor - 1e-4 or k == baseline}
    return min(ok, key=lambda k: ok[k]["prefill_ms"])


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


def _ours(int4: Path, contract, prompt: list[int], new: int, threads: int, prefill: Path | None = None):
    """One timed generation with locpath's decoder state, spinning on as the Pipeline runs its decoder; with
    `prefill`, the prompt runs on that graph (the bundle's decoder_fused_prefill) on the same K/V buffers."""
    from ..runtime.decoder_state import decoder_state
    from ..runtime.ort_runner import OrtRunner

    pre = OrtRunner(prefill, "decoder_fused_prefill", threads=threads, spin=True) if prefill else None
    st = decoder_state(OrtRunner(int4, "decoder", threads=threads, spin=True), contract, pre)

    def run():
        r = st.greedy(prompt, {}, new)
        return r.prefill_s, r.decode_s, r.steps, r.tokens

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


BYTES_TOLERANCE = 1.001  # "equal" weight bytes: norms, biases and scale layouts differ by ~0.05 % between builders
PEERS = ("onnxruntime_genai_int4", "onnxruntime_genai_int4_block128", "llamacpp_q4_0")
OURS = ("locpath_fused_int4", "locpath_fused_int4_block128", "locpath_fused_int4_block128_prefill")


def peer_summary(res: dict) -> dict:
    """Ours against the best peer measured in this run: the best peer decode (tokens/s) and the best peer prefill
    (ms), each against our fastest configuration that reads no more weight bytes per token than that peer (within
    BYTES_TOLERANCE; when none does, all of ours compete and `*_weight_bytes_ratio` shows by how much)."""
    peers = {k: res[k] for k in PEERS if "tokens_per_s" in res.get(k, {})}
    ours = {k: res[k] for k in OURS if "tokens_per_s" in res.get(k, {})}
    if not peers or not ours:
        return {"skipped": "no peer was measured"}
    dp = max(peers, key=lambda k: peers[k]["tokens_per_s"])
    pp = min(peers, key=lambda k: peers[k]["prefill_ms"])

    def within(peer: str) -> dict:
        cap = peers[peer].get("weight_bytes_per_token")
        return {k: v for k, v in ours.items() if cap is None or v["weight_bytes_per_token"] <= cap * BYTES_TOLERANCE} or ours

    od = max(within(dp), key=lambda k: ours[k]["tokens_per_s"])
    op = min(within(pp), key=lambda k: ours[k]["prefill_ms"])
    return {"best_decode_peer": dp, "best_decode_peer_tokens_per_s": peers[dp]["tokens_per_s"],
            "best_decode_peer_weight_bytes": peers[dp].get("weight_bytes_per_token"),
            "locpath_decode": od, "locpath_tokens_per_s": ours[od]["tokens_per_s"],
            "locpath_decode_weight_bytes": ours[od]["weight_bytes_per_token"],
            "decode_weight_bytes_ratio": (ours[od]["weight_bytes_per_token"] / peers[dp]["weight_bytes_per_token"]
                                          if peers[dp].get("weight_bytes_per_token") else None),
            "best_prefill_peer": pp, "best_prefill_peer_ms": peers[pp]["prefill_ms"],
            "locpath_prefill": op, "locpath_prefill_ms": ours[op]["prefill_ms"],
            "decode_vs_best_peer": ours[od]["tokens_per_s"] / peers[dp]["tokens_per_s"],
            "prefill_best_peer_over_locpath": peers[pp]["prefill_ms"] / ours[op]["prefill_ms"]}


def bench_decoder_05b(work: Path, log, prompt_len: int = 64, new: int = 64) -> dict:
    threads = os.cpu_count() or 1
    work.mkdir(parents=True, exist_ok=True)
    folder = _hf_folder(work, log)
    prompt = [int(x) for x in np.random.default_rng(0).integers(100, 400, prompt_len)]
    model = _text_only_model(folder)
    fw = _FusedWeights(model, 2048)
    fused_paths, fused_t = _locpath_fused(fw, folder, work, log)
    fused, fused128 = fused_paths[32], fused_paths[128]
    prefill_paths = _locpath_prefill(fw, folder, work, log)
    ref_logits = _reference_logits(model, prompt)
    int4, plain_t = _locpath_decoder(model, work, log)
    del model, fw
    res: dict = {"shape": "Qwen2.5-0.5B (random weights)", "prompt_tokens": prompt_len, "new_tokens": new,
                 "threads": threads}
    log("prefill candidates for the fused decoder (64 tokens, alternating rounds)")
    cands = _prefill_candidates({"decode-graph-int4-b32": fused, "decode-graph-int4-b128": fused128, **prefill_paths},
                                fused_t, prompt, threads, ref_logits)
    best_prefill = choose_prefill(cands, "decode-graph-int4-b128")
    res["prefill_candidates"] = cands
    res["prefill_choice"] = best_prefill
    runs = {"locpath_fused_int4": _ours(fused, fused_t, prompt, new, threads),
            "locpath_fused_int4_block128": _ours(fused128, fused_t, prompt, new, threads),
            "locpath_int4": _ours(int4, plain_t, prompt, new, threads)}
    if best_prefill in prefill_paths:
        runs["locpath_fused_int4_block128_prefill"] = _ours(fused128, fused_t, prompt, new, threads,
                                                           prefill_paths[best_prefill])
    try:
        import onnxruntime_genai  # noqa: F401

        runs["onnxruntime_genai_int4"] = _genai(_genai_model(folder, work, threads, log), prompt, new)
        runs["onnxruntime_genai_int4_block128"] = _genai(_genai_model(folder, work, threads, log, 128), prompt, new)
    except ImportError:
        res["onnxruntime_genai_int4"] = {"skipped": "onnxruntime-genai is not installed"}
    from . import llamacpp

    gguf = None
    if llamacpp.available():
        gguf = llamacpp.q4_0_model(folder, work, log)
        runs["llamacpp_q4_0"] = llamacpp.runner(gguf, prompt, new, threads)
    else:
        res["llamacpp_q4_0"] = {"skipped": llamacpp.INSTALL_HINT}
    log(f"decoding with {', '.join(runs)} (alternating rounds)")
    res.update(_rounds(runs))
    weights = {"locpath_fused_int4": fused, "locpath_fused_int4_block128": fused128, "locpath_int4": int4,
               "locpath_fused_int4_block128_prefill": fused128}
    for k, path in weights.items():
        if k in res:
            res[k]["file_mb"] = round(path.stat().st_size / 1e6, 1)
            res[k]["weight_bytes_per_token"] = onnx_weight_bytes(path)
    if "locpath_fused_int4_block128_prefill" in res:
        res["locpath_fused_int4_block128_prefill"]["prefill_graph"] = best_prefill
        res["locpath_fused_int4_block128_prefill"]["prefill_graph_mb"] = round(
            prefill_paths[best_prefill].stat().st_size / 1e6, 1)
    for k, b in (("onnxruntime_genai_int4", 32), ("onnxruntime_genai_int4_block128", 128)):
        if "tokens_per_s" in res.get(k, {}):
            g = _genai_model(folder, work, threads, log, b)
            res[k]["weight_bytes_per_token"] = sum(onnx_weight_bytes(p) for p in g.glob("*.onnx"))
    if gguf is not None:
        wb = llamacpp.gguf_weight_bytes(gguf)
        res["llamacpp_q4_0"].update(weight_bytes_per_token=wb["total"], weight_types=wb["by_type"],
                                    token_embd_type=wb["token_embd"], file_mb=round(gguf.stat().st_size / 1e6, 1))
    res["summary"] = peer_summary(res)
    for k in runs:  # random weights give near-flat logits: token agreement between INT4 models says nothing here
        res[k].pop("tokens")
    log("decoding with transformers eager fp32")
    res["transformers_eager_fp32"] = _eager_tokens_per_s(folder, prompt, new)
    return res
