"""A random-weight Qwen2 folder in the layout the hub ships (bf16 safetensors shards, index, config, tokenizer),
written shard by shard so a 7B-shaped one fits a small box. Used by bench --published and its vision part, and by
tests; nothing is downloaded."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np


def qwen2_tensors(shape: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every tensor of a Qwen2 causal LM, in the order HF stores them."""
    d, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = d // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, d), "normal")]
    for j in range(shape["num_hidden_layers"]):
        p = f"model.layers.{j}."
        out += [(p + "input_layernorm.weight", (d,), "ones"), (p + "post_attention_layernorm.weight", (d,), "ones"),
                (p + "self_attn.q_proj.weight", (d, d), "normal"), (p + "self_attn.q_proj.bias", (d,), "small"),
                (p + "self_attn.k_proj.weight", (kv, d), "normal"), (p + "self_attn.k_proj.bias", (kv,), "small"),
                (p + "self_attn.v_proj.weight", (kv, d), "normal"), (p + "self_attn.v_proj.bias", (kv,), "small"),
                (p + "self_attn.o_proj.weight", (d, d), "normal"),
                (p + "mlp.gate_proj.weight", (i, d), "normal"), (p + "mlp.up_proj.weight", (i, d), "normal"),
                (p + "mlp.down_proj.weight", (d, i), "normal")]
    out.append(("model.norm.weight", (d,), "ones"))
    if not shape["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, d), "normal"))
    return out


def _bf16_chunks(n: int, init: str, rng, chunk: int = 1 << 25):
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        if init == "ones":
            x = np.ones(m, np.float32)
        else:
            x = rng.standard_normal(m, dtype=np.float32) * np.float32(0.02 if init == "normal" else 0.002)
        yield (x.view(np.uint32) >> 16).astype(np.uint16)  # bf16: the upper half of each float32


def write_random_hf_folder(folder: Path, shape: dict, tokenizer_file: Path, seed: int = 0,
                           shard_bytes: int = 4 * 10**9, log=print) -> Path:
    """A Qwen2 folder with random bf16 weights written shard by shard (never more than one chunk in memory),
    config.json from transformers' own Qwen2Config, the index, and a tokenizer. Written to a temporary folder and
    renamed, so an interrupted run leaves nothing that looks finished."""
    import shutil

    from transformers import Qwen2Config

    from ..fsutil import atomic_dir

    tensors = qwen2_tensors(shape)
    shards, cur, size = [], [], 0
    for t in tensors:
        nbytes = math.prod(t[1]) * 2
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += nbytes
    shards.append(cur)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    with atomic_dir(folder) as tmp:
        # as save_pretrained writes it: tools (onnxruntime-genai's builder) read `architectures`
        Qwen2Config(**shape, torch_dtype="bfloat16", architectures=["Qwen2ForCausalLM"]).to_json_file(
            str(tmp / "config.json"))
        weight_map, total = {}, 0
        for k, group in enumerate(shards):
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            header, off = {}, 0
            for tname, tshape, _ in group:
                n = math.prod(tshape) * 2
                header[tname] = {"dtype": "BF16", "shape": list(tshape), "data_offsets": [off, off + n]}
                off += n
                weight_map[tname] = name
            header["__metadata__"] = {"format": "pt"}
            hb = json.dumps(header).encode()
            hb += b" " * (-len(hb) % 8)
            with open(tmp / name, "wb") as f:
                f.write(len(hb).to_bytes(8, "little") + hb)
                for tname, tshape, init in group:
                    for c in _bf16_chunks(math.prod(tshape), init, rng):
                        f.write(c.tobytes())
            total += off
            log(f"published: wrote {name} ({off / 1e9:.1f} GB, {time.time() - t0:.0f} s)")
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
    return folder
