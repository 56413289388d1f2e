"""How many tiles one tile-encoder call takes. `--tile-batch` is the most; a ViT with large tiles takes fewer, so
that one call's activations (attention scores of every head plus the MLP's hidden layer, fp32) stay within
ACTIVATION_BUDGET: CONCH v1 at 448 px holds ~39 MB of them per tile, and 32 tiles a call added ~1.2 GB to the
published-scale peak RSS for no gain in tiles/s (bench --published --slide). Small encoders keep the full batch."""

from __future__ import annotations

ACTIVATION_BUDGET = 96 << 20  # bytes of one call's attention scores and MLP activations


def activation_bytes_per_tile(encoder: dict) -> int | None:
    """fp32 bytes of one tile's attention scores (heads x tokens^2) and MLP hidden layer, or None where the
    encoder's shape is not in the manifest (feature-file bundles, unknown families)."""
    try:
        img, patch = int(encoder["img_size"]), int(encoder["patch_size"])
        heads, width = int(encoder["num_heads"]), int(encoder["embed_dim"])
        mlp = float(encoder.get("mlp_ratio") or 4.0)
    except (KeyError, TypeError, ValueError):
        return None
    if min(img, patch, heads, width) < 1 or not 0 < mlp < 64:
        return None
    tokens = (img // patch) ** 2 + 1
    return int(4 * (heads * tokens * tokens + tokens * width * mlp))


def encoder_tile_batch(requested: int, encoder: object) -> int:
    """The tiles per encoder call: `requested` (`--tile-batch`), fewer where one call's activations would pass the
    budget, never below 1."""
    per_tile = activation_bytes_per_tile(encoder) if isinstance(encoder, dict) else None
    if not per_tile:
        return requested
    return max(1, min(requested, ACTIVATION_BUDGET // per_tile))
