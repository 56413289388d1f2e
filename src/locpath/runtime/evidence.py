"""Which tiles weighed most for a question: the TIS scores carried back through the resampler's cross-attention
and the STM merges to tiles.

A selected latent l enters CARA scaled by sigmoid(score_l); it is a mixture of the STM tokens it attended to
(the resampler's cross-attention A[l, t], averaged over heads and blocks); a token stands for the tiles STM merged
into it. So the share of the question's reading that falls on a tile is
    share_tile = sum_l sigmoid(s_l) A[l, t] / sum_l sigmoid(s_l) / count_t      (t: the tile's token)
and a tile is evidence in proportion to how much more than an even share it got: max(0, N * share - 1), over N
tiles, normalised to sum 1 (uniform when no tile stands out). The attention of this model is broad: tumour tiles
get about ten times their even share, but much of the mass stays spread over ordinary tissue, which the lift
removes. No gradient and no extra graph: the attention is an output of the resampler graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Evidence:
    """Per-tile weights and where the tiles lie: level-0 top-left corners and the tiles' real side
    (patch_size_level0, also when neighbouring tiles overlap and the grid stride is smaller). Without positions
    (spatial False: a SlideChat CSV) a tile is named by its row in the feature file and no heatmap can be drawn."""

    coords: np.ndarray  # (N, 2) level-0 x, y of every tile
    tile_size_level0: int
    weights: np.ndarray  # (N,) sums to 1
    spatial: bool = True

    def top(self, k: int = 32) -> list[dict]:
        order = np.argsort(-self.weights, kind="stable")[:k]
        if not self.spatial:
            return [{"tile": int(i), "weight": round(float(self.weights[i]), 6)} for i in order if self.weights[i] > 0]
        return [{"x": int(self.coords[i, 0]), "y": int(self.coords[i, 1]), "weight": round(float(self.weights[i]), 6)}
                for i in order if self.weights[i] > 0]

    def to_dict(self, k: int = 32) -> dict:
        if not self.spatial:
            return {"tile_size_level0": None, "tiles": len(self.weights), "top": self.top(k),
                    "positions": "unavailable: the feature file carries no tile coordinates (tiles are its rows)"}
        return {"tile_size_level0": int(self.tile_size_level0), "tiles": len(self.weights), "top": self.top(k)}


def tile_weights(attention: np.ndarray, selected: np.ndarray, scores: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """attention (L, T) latent -> token; selected (M,) latent indices; scores (L,) TIS scores; assignment (N,) the
    token of each tile -> (N,) non-negative tile weights summing to 1 (uniform when nothing stands out)."""
    att = np.asarray(attention, np.float64)
    gate = 1.0 / (1.0 + np.exp(-np.asarray(scores, np.float64)[selected]))
    token = (gate[:, None] * att[selected]).sum(0) / max(gate.sum(), 1e-12)
    counts = np.bincount(assignment, minlength=att.shape[1]).astype(np.float64)
    share = token[assignment] / np.maximum(counts[assignment], 1.0)
    n = len(assignment)
    lift = np.clip(share / max(share.sum(), 1e-300) * n - 1.0, 0.0, None)
    total = lift.sum()
    return lift / total if total > 0 else np.full(n, 1.0 / max(n, 1))
