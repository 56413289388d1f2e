"""PyTorch eager fp32/bf16 for the tile encoder and the decoder of the bundle's source checkpoint, beside the
bundle's own (and, for a fused decoder, the plain graph of the same bundle back to back); JSON `baselines`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ...bundle.names import DECODER, DECODER_FUSED
from ..suite import Context, Skip, Suite


def torch_baselines(pipe, checkpoint: Path, tiles: np.ndarray, cfg) -> dict:
    import torch

    from ..report import _median_time, decode_speed, encoder_speed, mean_cosine
    from ...models.checkpoint import load_checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load_checkpoint(checkpoint)
    x = torch.from_numpy(np.ascontiguousarray(tiles[:32]))
    out = {}
    with torch.no_grad():
        f32 = model.tile_encoder.forward_uint8(x).numpy()
        t = _median_time(lambda: model.tile_encoder.forward_uint8(x), cfg.warmup, cfg.repeats)
        out["pytorch_encoder_fp32"] = {"tiles_per_s": len(x) / t}
        enc16 = model.tile_encoder.to(torch.bfloat16)
        b16 = enc16.forward_uint8(x).float().numpy()
        t = _median_time(lambda: enc16.forward_uint8(x), cfg.warmup, cfg.repeats)
        out["pytorch_encoder_bf16"] = {"tiles_per_s": len(x) / t, "cosine": mean_cosine(b16, f32)}
        model.tile_encoder.float()
        out["pytorch_decoder_fp32"] = {"tokens_per_s": _torch_decode_speed(model, tok, cfg.question)}
    ours = pipe.encode_tiles(tiles[:32])
    out["bundle_encoder"] = {"tiles_per_s": encoder_speed(pipe, tiles), "cosine": mean_cosine(ours, f32)}
    out["bundle_decoder"] = {"tokens_per_s": decode_speed(pipe, cfg.question), "graph": pipe.decoder_component}
    if pipe.decoder_component == DECODER_FUSED and DECODER in pipe.manifest.components:
        from ...runtime.pipeline import Pipeline  # the plain graph of the same bundle, back to back

        plain = Pipeline(pipe.bundle_dir, pipe.manifest, use_cache=False, decoder="plain")
        out["bundle_decoder_plain"] = {"tokens_per_s": decode_speed(plain, cfg.question), "graph": "decoder"}
        out["bundle_decoder"]["tokens_per_s_again"] = decode_speed(pipe, cfg.question)
        plain.release()
    return out


def _torch_decode_speed(model, tok, question: str, steps: int = 32) -> float:
    import torch

    lat = torch.randn(1, model.cfg.resampler.num_latents, model.cfg.resampler.dim)
    q_ids, q_mask = model.question_batch(tok, [question])
    kv, _, _ = model.question_kv(lat, q_ids, q_mask)
    ids = torch.tensor([model.prompt_ids(tok, question)])

    def run():
        with model.cara.visual_context(kv):
            out = model.llm(input_ids=ids, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            nxt = torch.tensor([[7]])
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model.llm(input_ids=nxt, cache=cache, use_cache=True)
            return time.perf_counter() - t0

    run()
    return steps / float(np.median([run() for _ in range(3)]))


def source_checkpoint(pipe) -> Path | None:
    """The checkpoint the bundle was exported from: the recorded folder when it is still there, else the shipped
    checkpoint whose weights have the recorded sha256 (a prebuilt bundle records the machine it was built on)."""
    from ...bundle.paths import sha256_file
    from ...checkpoints import shipped_checkpoint

    p = pipe.manifest.source.get("checkpoint")
    if p and (Path(p) / "model.safetensors").exists():
        return Path(p)
    want = pipe.manifest.source.get("weights_sha256")
    for name in ("reference",):
        w = shipped_checkpoint(name) / "model.safetensors"
        if want and w.exists() and sha256_file(w) == want:
            return w.parent
    return None


def run(ctx: Context) -> dict:
    if not ctx.cfg.baselines:
        return {}
    checkpoint = source_checkpoint(ctx.pipe) if ctx.torch else None
    if checkpoint is None:
        raise Skip("torch or the bundle's source checkpoint is not available")
    from ...wsi import TileReader, open_slide

    with open_slide(ctx.slide) as s:
        tiles = next(iter(TileReader(s, ctx.pipe.plan_tiles(s).grid, batch_size=64))).tiles
    ctx.log("PyTorch eager baselines (fp32, bf16) for the encoder and the decoder")
    return torch_baselines(ctx.pipe, checkpoint, tiles, ctx.cfg)


def ratios(report: dict) -> dict:
    b, r = report.get("baselines", {}), {}
    if "pytorch_encoder_fp32" in b:
        r["encoder_vs_pytorch_fp32"] = b["bundle_encoder"]["tiles_per_s"] / b["pytorch_encoder_fp32"]["tiles_per_s"]
        r["encoder_vs_pytorch_bf16"] = b["bundle_encoder"]["tiles_per_s"] / b["pytorch_encoder_bf16"]["tiles_per_s"]
        r["decoder_vs_pytorch_fp32"] = b["bundle_decoder"]["tokens_per_s"] / b["pytorch_decoder_fp32"]["tokens_per_s"]
    if "bundle_decoder_plain" in b:
        fused = float(np.median([b["bundle_decoder"]["tokens_per_s"], b["bundle_decoder"]["tokens_per_s_again"]]))
        r["decoder_fused_vs_plain"] = fused / b["bundle_decoder_plain"]["tokens_per_s"]
    return r


def targets(report: dict) -> dict:
    b, r = report.get("baselines", {}), report["ratios"]
    if "pytorch_encoder_fp32" not in b:
        return {}
    return {"encoder_1.2x_pytorch_bf16_at_cosine_0.999": {
        "target": 1.2, "value": r["encoder_vs_pytorch_bf16"], "cosine": b["bundle_encoder"]["cosine"],
        "met": r["encoder_vs_pytorch_bf16"] >= 1.2 and b["bundle_encoder"]["cosine"] >= 0.999}}


SUITE = Suite("pytorch_baselines", "baselines", run, ratios=ratios, targets=targets)
