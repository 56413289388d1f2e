"""Weights of a LocPathModel's decoder (Hugging Face Qwen2/Llama + CARA blocks), laid out for the fused graph
(`engines/fused_graph.py`): MatMul weights as [in, out], q/k/v and gate/up packed, the rotary cos/sin caches
computed from the model's own inverse frequencies, CARA gates as their tanh.
"""

from __future__ import annotations

import numpy as np

from ..bundle import names
from ..engines.fused_graph import FusedDecoderSpec
from ..errors import LocpathError

# rope variants whose frequencies do not depend on the sequence length fold into fixed cos/sin caches
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def fused_decoder_inputs(model, max_positions: int) -> tuple[FusedDecoderSpec, dict[str, np.ndarray]]:
    spec = fused_spec(model, max_positions)
    return spec, fused_weights(model, spec)


def fused_spec(model, max_positions: int) -> FusedDecoderSpec:
    """The graph's sizes, or a LocpathError naming what the fused builder does not support."""
    llm, c = model.llm, model.llm.config
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in STATIC_ROPE:
        raise LocpathError(f"rope type {rope_type!r} is not supported by the fused decoder "
                           f"(supported: {', '.join(STATIC_ROPE)}); the plain decoder graph still works")
    if getattr(c, "mlp_bias", False) or getattr(c, "hidden_act", "silu") != "silu":
        raise LocpathError("the fused decoder expects a SwiGLU MLP without bias (Qwen2/Llama); "
                           "the plain decoder graph still works")
    if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", False):
        raise LocpathError("sliding-window attention is not supported by the fused decoder")
    layers = llm.model.layers
    attn0 = layers[0].self_attn
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    qkv_bias = attn0.q_proj.bias is not None
    if getattr(attn0.o_proj, "bias", None) is not None:
        raise LocpathError("the fused decoder expects an o_proj without bias")
    cara_ids = list(model.cara.layer_ids) if model.cara is not None else []
    cara_ffn = model.cara.blocks[str(cara_ids[0])].ffn.fc1.out_features if cara_ids else 0
    tied = bool(getattr(c, "tie_word_embeddings", False)) and \
        llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()
    return FusedDecoderSpec(
        num_layers=c.num_hidden_layers, hidden=c.hidden_size, num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads, head_dim=hd, intermediate=c.intermediate_size, vocab=c.vocab_size,
        rms_eps=float(c.rms_norm_eps), max_positions=int(max_positions), tied_embeddings=tied, qkv_bias=qkv_bias,
        cara_layers=cara_ids, cara_heads=model.cfg.cara.num_heads if cara_ids else 0, cara_ffn=cara_ffn,
        cara_eps=float(model.cara.blocks[str(cara_ids[0])].norm.eps) if cara_ids else 1e-6,
    )


def fused_weights(model, spec: FusedDecoderSpec) -> dict[str, np.ndarray]:
    """The weights in the graph's layout (float32 copies of the model's parameters)."""
    import torch

    llm, tied, qkv_bias = model.llm, spec.tied_embeddings, spec.qkv_bias
    with torch.no_grad():
        rot = llm.model.rotary_emb
        inv = rot.inv_freq.double().cpu().numpy()
        scale = float(getattr(rot, "attention_scaling", 1.0))
        freqs = np.arange(spec.max_positions, dtype=np.float64)[:, None] * inv[None, :]
        w = {"embed": _np(llm.model.embed_tokens.weight), "norm": _np(llm.model.norm.weight),
             "rope.cos_cache": (np.cos(freqs) * scale).astype(np.float32),
             "rope.sin_cache": (np.sin(freqs) * scale).astype(np.float32)}
        if not tied:
            w["lm_head"] = _np(llm.lm_head.weight)
        for j, layer in enumerate(llm.model.layers):
            a, m, p = layer.self_attn, layer.mlp, f"layers.{j}."
            w[p + "ln1"] = _np(layer.input_layernorm.weight)
            w[p + "ln2"] = _np(layer.post_attention_layernorm.weight)
            w[p + "qkv.weight"] = np.concatenate([_np(a.q_proj.weight), _np(a.k_proj.weight), _np(a.v_proj.weight)]).T
            if qkv_bias:
                w[p + "qkv.bias"] = np.concatenate([_np(a.q_proj.bias), _np(a.k_proj.bias), _np(a.v_proj.bias)])
            w[p + "o.weight"] = _np(a.o_proj.weight).T
            w[p + "gate_up.weight"] = np.concatenate([_np(m.gate_proj.weight), _np(m.up_proj.weight)]).T
            w[p + "down.weight"] = _np(m.down_proj.weight).T
        w.update(cara_fused_weights(model, spec.cara_layers))
    return {k: np.array(v, dtype=np.float32, order="C") for k, v in w.items()}


def cara_fused_weights(model, layers) -> dict[str, np.ndarray]:
    """The CARA blocks' weights in the fused graph's layout (what a streamed decoder takes beside the shards)."""
    import torch

    w = {}
    with torch.no_grad():
        for i in layers:
            blk, p = model.cara.blocks[str(i)], f"cara.{i}."
            w.update({p + "norm": _np(blk.norm.weight), p + "q.weight": _np(blk.q_proj.weight).T,
                      p + "o.weight": _np(blk.o_proj.weight).T, p + "router.weight": _np(blk.router.weight).T,
                      p + "router.bias": _np(blk.router.bias), p + "attn_scale": _np(torch.tanh(blk.attn_gate)),
                      p + "ffn_norm": _np(blk.ffn_norm.weight), p + "fc1.weight": _np(blk.ffn.fc1.weight).T,
                      p + "fc1.bias": _np(blk.ffn.fc1.bias), p + "fc2.weight": _np(blk.ffn.fc2.weight).T,
                      p + "fc2.bias": _np(blk.ffn.fc2.bias), p + "ffn_scale": _np(torch.tanh(blk.ffn_gate))})
    return {k: np.array(v, dtype=np.float32, order="C") for k, v in w.items()}


def validate_fused(path, model, spec: FusedDecoderSpec, prompt_len: int = 9, steps: int = 4, seed: int = 0,
                   atol: float = 1e-4) -> float:
    """Prefill + single-token steps through the runtime's FusedDecoderState against the PyTorch model's full
    forward; returns the max abs logit difference (relative to the logits' scale), raises ValidationError."""
    import torch

    from ..runtime.decoder_state import FusedDecoderState
    from ..runtime.ort_runner import OrtRunner
    from .exporter import ValidationError

    g = torch.Generator().manual_seed(seed)
    total = prompt_len + steps
    ids = torch.randint(0, spec.vocab, (1, total), generator=g)
    cross_t, cross = {}, {}
    if spec.cara_layers:
        lat = torch.randn(1, model.cfg.tis.top_m, model.cfg.resampler.dim, generator=g)
        with torch.no_grad():
            cross_t = model.cara.cross_kv(lat)
        for i, (k, v) in cross_t.items():
            cross[f"cross_key.{i}"], cross[f"cross_value.{i}"] = k.numpy(), v.numpy()
    with torch.no_grad(), model.cara.visual_context(cross_t or None):
        ref = model.llm(input_ids=ids).logits[0].numpy()
    runner = OrtRunner(path, names.DECODER_FUSED)
    st = FusedDecoderState(runner, spec.contract())
    ids_np = ids.numpy()[0]
    got = st.greedy(ids_np[:prompt_len].tolist(), cross, forced=ids_np[prompt_len:total].tolist(),
                    keep_logits=True).logits
    runner.release()
    want = ref[prompt_len - 1:]
    diff = float(np.abs(np.stack(got) - want).max())
    scale = max(1.0, float(np.abs(want).max()))
    if not diff <= atol * scale:
        raise ValidationError(names.DECODER_FUSED, {"prompt": prompt_len, "steps": steps}, {"logits": diff},
                              atol * scale)
    return diff
