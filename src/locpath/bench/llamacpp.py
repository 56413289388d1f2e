"""llama.cpp as a peer in `bench --decoder-0.5b` and `bench --published` (bench/published_llamacpp.py): the same
Hugging Face folder written as GGUF (streamed from its shards), quantized to Q4_0 by llama.cpp itself, run through
llama-cpp-python on the same prompt tokens with the same thread count.

Why a writer of our own instead of llama.cpp's convert_hf_to_gguf.py: that script ships only in llama.cpp's source
tree (not in the llama-cpp-python wheel) and refuses a tokenizer it does not know. A Qwen2 folder maps onto GGUF
tensor for tensor (no permutation: qwen2 uses NEOX rotary, as Hugging Face does), so the writer is short and
checked by reading the file back (tests/test_prefill.py). llama-cpp-python is optional: its build takes ~10 min
(docs/llamacpp.md has the recipe, with the GCC 12 AMX fix); without it the bench records a `skipped` entry.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from ..errors import LocpathError

INSTALL_HINT = ("llama-cpp-python is not installed: build it as docs/llamacpp.md says (about 10 min on 2 cores; "
                "GCC 12 needs the AMX tile-config fix)")
# Hugging Face Qwen2 names -> GGUF names (llama.cpp's qwen2 architecture)
LAYER_MAP = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
             "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
             "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
TOP_MAP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
LLAMA_FTYPE_MOSTLY_Q4_0 = 2


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of a Hugging Face Qwen2 tensor (LocpathError for a name llama.cpp has no slot for)."""
    if hf_name in TOP_MAP:
        return TOP_MAP[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in LAYER_MAP:
        return f"blk.{parts[2]}.{LAYER_MAP[parts[3]]}"
    raise LocpathError(f"GGUF: no qwen2 tensor for {hf_name!r}")


def _tokenizer_tables(folder: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], dict]:
    """Tokens (padded to the model's vocabulary with [PAD<i>], as convert_hf_to_gguf.py does), their types,
    BPE merges as 'a b' strings, and the special ids, from the folder's tokenizer.json."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise LocpathError(f"{folder / 'tokenizer.json'}: GGUF writer takes a byte-level BPE tokenizer, "
                           f"not {model.get('type')!r}")
    tokens: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    special: set[int] = set()
    for a in tok.get("added_tokens", []):
        tokens[int(a["id"])] = a["content"]
        if a.get("special"):
            special.add(int(a["id"]))
    if max(tokens) >= vocab_size:
        raise LocpathError(f"{folder}: tokenizer id {max(tokens)} beyond the model's vocabulary of {vocab_size}")
    names = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [3 if i in special else 1 if i in tokens else 5 for i in range(vocab_size)]  # control/normal/unused
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {t: i for i, t in tokens.items()}
    return names, types, merges, {"eos": ids.get("<|im_end|>", ids.get("<|endoftext|>")),
                                  "pad": ids.get("<|endoftext|>")}


def _metadata(w, folder: Path, cfg: dict, rope: float) -> None:
    """The qwen2 architecture's keys and the folder's tokenizer, as convert_hf_to_gguf.py writes them."""
    names, types, merges, ids = _tokenizer_tables(folder, cfg["vocab_size"])
    w.add_name(folder.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_file_type(1)  # mostly f16
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(names)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if ids["eos"] is not None:
        w.add_eos_token_id(ids["eos"])
        w.add_bos_token_id(ids["eos"])
    if ids["pad"] is not None:
        w.add_pad_token_id(ids["pad"])
    w.add_add_bos_token(False)


def _converted(weights, name: str, dtype, chunk: int = 1 << 24) -> np.ndarray:
    """One tensor in its GGUF dtype, converted a block of rows at a time (bf16 -> f16 goes through float32; a
    whole 7B embedding in float32 would be 2.2 GB beside its 1.1 GB f16 copy)."""
    shape = weights.shape(name)
    if len(shape) < 2:
        return weights.array(name).astype(dtype)
    out = np.empty(shape, dtype)
    step = max(1, chunk // max(1, math.prod(shape[1:])))
    for r in range(0, shape[0], step):
        out[r:r + step] = weights.array(name, slice(r, r + step))
    return out


def write_gguf(folder: str | Path, out: str | Path, chunk: int = 1 << 24) -> dict:
    """A Qwen2 Hugging Face folder (config.json, model.safetensors or shards with their index, tokenizer.json) as
    an f16 GGUF (norms and biases f32). Streamed: every tensor's header entry is written first, then the tensors
    one at a time, each read from its shard only when it is written, so the peak is one tensor, not the model
    (GGUFWriter.add_tensor would hold them all: 15 GB at 7B); `chunk`: elements converted at a time."""
    import gguf

    from ..engines.hf_weights import HFFolder

    folder, out = Path(folder), Path(out)
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") != "qwen2":
        raise LocpathError(f"{folder / 'config.json'}: GGUF writer takes model_type qwen2, not {cfg.get('model_type')!r}")
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    if rope is None:
        raise LocpathError(f"{folder / 'config.json'}: no rope_theta")
    hf, w = HFFolder(folder), None
    try:
        plan = [(k, gguf_name(k), np.dtype(np.float16 if len(hf.weights.shape(k)) == 2 else np.float32))
                for k in hf.weights.names() if not (k == "lm_head.weight" and cfg.get("tie_word_embeddings"))]
        w = gguf.GGUFWriter(str(out), "qwen2")
        _metadata(w, folder, cfg, rope)
        for k, name, dt in plan:
            shape = hf.weights.shape(k)
            w.add_tensor_info(name, shape, dt, math.prod(shape) * dt.itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for k, _, dt in plan:
            w.write_tensor_data(_converted(hf.weights, k, dt, chunk))
    finally:
        if w is not None:
            w.close()
        hf.weights.close()
    return {"tensors": len(plan), "bytes": out.stat().st_size}


def quantize(src: Path, out: Path, ftype: int = LLAMA_FTYPE_MOSTLY_Q4_0, threads: int = 2) -> None:
    """llama.cpp's own quantizer (llama-quantize's library call); tied embeddings get its default type."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = ftype, threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), p)
    if rc != 0:
        raise LocpathError(f"{src}: llama.cpp quantization failed (code {rc})")


def q4_0_model(folder: Path, work: Path, log, tag: str = "0.5b") -> Path:
    """The folder as Q4_0 GGUF, cached in `work` (the f16 intermediate is removed)."""
    out = work / f"llamacpp-{tag}-q4_0.gguf"
    if not out.exists():
        log(f"writing the {tag}-shaped folder as GGUF (f16), then llama.cpp Q4_0")
        build_q4_0(folder, out)
    return out


def build_q4_0(folder: str | Path, out: str | Path) -> dict:
    """Write the folder as f16 GGUF beside `out`, quantize it to Q4_0 into `out` (renamed into place when done),
    and remove the f16 file whatever happens: at 7B it is 15 GB. A bench step (bench/child.py), so the peak RSS
    the child reports is this build's own."""
    out = Path(out)
    f16, tmp = out.with_name(out.stem + "-f16.gguf.tmp"), out.with_name(out.name + ".tmp")
    threads = os.cpu_count() or 1
    try:
        t0 = time.perf_counter()
        info = write_gguf(folder, f16)
        t1 = time.perf_counter()
        quantize(f16, tmp, threads=threads)
        t2 = time.perf_counter()
        tmp.rename(out)
    finally:
        f16.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return {"f16_bytes": info["bytes"], "tensors": info["tensors"], "write_f16_seconds": round(t1 - t0, 1),
            "quantize_seconds": round(t2 - t1, 1), "quantize_threads": threads, "bytes": out.stat().st_size}


def gguf_weight_bytes(path: Path) -> dict:
    """Bytes of every tensor in the file, and by type (what a decode step reads: all of them once)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    by_type: dict[str, int] = {}
    for t in r.tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    return {"total": sum(by_type.values()), "by_type": by_type, "token_embd": emb.tensor_type.name}


def runner(model: Path, prompt: list[int], new: int, threads: int, use_mmap: bool = True):
    """One timed greedy generation per call, as the other engines: (prefill s, decode s, decoded steps, tokens).
    `use_mmap` False: llama.cpp reads the file instead of mapping it (repacked weights are then held once)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=len(prompt) + new + 8, n_batch=max(len(prompt), 8),
                          n_ubatch=max(len(prompt), 8), n_threads=threads, n_threads_batch=threads,
                          use_mmap=use_mmap, verbose=False)
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))

    def run():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        toks = [int(last_logits().argmax())]
        for _ in range(new - 1):
            llm.eval([toks[-1]])
            toks.append(int(last_logits().argmax()))
        return t1 - t0, time.perf_counter() - t1, new - 1, toks

    return run
