"""Tiles per tile-encoder call: `--tile-batch` is the most, and a ViT with large tiles takes fewer (its activations
bounded), while the shipped bundle's small encoder keeps the whole batch (its answers are golden)."""

import json

from servers import shipped

from locpath.runtime.tile_batch import ACTIVATION_BUDGET, activation_bytes_per_tile, encoder_tile_batch

CONCH = {"img_size": 448, "patch_size": 16, "embed_dim": 768, "num_heads": 12, "mlp_ratio": 4.0}
UNI = {"img_size": 224, "patch_size": 16, "embed_dim": 1024, "num_heads": 16, "mlp_ratio": 4.0}


def test_large_tiles_take_fewer_per_call_and_stay_within_the_budget():
    assert encoder_tile_batch(32, CONCH) == 2
    assert 2 * activation_bytes_per_tile(CONCH) <= ACTIVATION_BUDGET < 3 * activation_bytes_per_tile(CONCH)
    assert encoder_tile_batch(32, UNI) == ACTIVATION_BUDGET // activation_bytes_per_tile(UNI) < 32
    assert encoder_tile_batch(1, CONCH) == 1 and encoder_tile_batch(1, UNI) == 1  # never above what was asked
    assert encoder_tile_batch(32, dict(CONCH, img_size=4096)) == 1  # never below one


def test_the_shipped_encoder_keeps_the_batch_and_unknown_shapes_are_left_alone():
    from locpath.runtime.pipeline import Pipeline

    enc = json.loads((shipped() / "manifest.json").read_text())["model"]["tile_encoder"]
    assert encoder_tile_batch(32, enc) == 32
    assert Pipeline.from_bundle(shipped(), use_cache=False, warmup=False).tile_batch == 32
    for odd in (None, {}, {"img_size": "x"}, dict(CONCH, num_heads=0), dict(CONCH, mlp_ratio=float("nan"))):
        assert encoder_tile_batch(16, odd) == 16
