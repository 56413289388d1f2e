"""Old names of the tile encoder, kept only for callers not yet moved to `models/encoders.py`.

The hand-written ViT that lived here is gone: every tile encoder is built by timm (`build_tile_encoder`), with the
same state-dict keys, and loaded by `load_encoder_weights`. New code imports those from `models.encoders`.
"""

from __future__ import annotations

from .encoders import build_tile_encoder as VisionTransformer
from .encoders import load_encoder_weights as load_timm_checkpoint

__all__ = ["VisionTransformer", "load_timm_checkpoint"]
