"""STM, the Sparse Token Merger: numpy, shared by training and the torch-free runtime.

Design (LoC-Path publishes no formula): tile tokens are grouped into non-overlapping `window x window`
blocks of the tile grid (spatial adjacency); inside a block, a token joins the first cluster whose
founding token has cosine similarity >= `threshold` with it, else it founds a new cluster. A cluster
becomes one token: the mean feature, the mean grid position, and its member count. Near-duplicate normal
tissue collapses up to window^2-fold; a tile unlike its neighbours (the sparse diagnostic evidence) is
never averaged away. Deterministic: blocks in row-major order, members in input order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MergedTokens:
    features: np.ndarray  # float32 (N', D)
    positions: np.ndarray  # float32 (N', 2): mean (column, row) in tile-grid units
    counts: np.ndarray  # float32 (N',): tiles merged into each token
    assignment: np.ndarray  # int64 (N,): merged token of each input tile

    def __len__(self) -> int:
        return len(self.features)


def merge_tokens(features: np.ndarray, grid_index: np.ndarray, window: int = 2, threshold: float = 0.95,
                 enabled: bool = True) -> MergedTokens:
    feats = np.asarray(features, dtype=np.float32)
    grid = np.asarray(grid_index, dtype=np.int64)
    n = len(feats)
    if feats.ndim != 2 or grid.shape != (n, 2):
        raise ValueError(f"merge_tokens: features (N, D) and grid_index (N, 2) expected, got {feats.shape}, {grid.shape}")
    if n == 0:
        return MergedTokens(feats, np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    if not enabled or window <= 1:
        return MergedTokens(feats.copy(), grid.astype(np.float32), np.ones(n, np.float32), np.arange(n))

    unit = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    block = grid // window
    order = np.lexsort((np.arange(n), block[:, 0], block[:, 1]))  # row-major blocks, stable inside
    sb = block[order]
    starts = np.flatnonzero(np.r_[True, np.any(sb[1:] != sb[:-1], axis=1)])
    ends = np.r_[starts[1:], n]

    assignment = np.empty(n, np.int64)
    founders: list[int] = []
    n_out = 0
    for s, e in zip(starts, ends):
        members = order[s:e]
        local_founders: list[int] = []
        local_ids: list[int] = []
        for i in members:
            for f, out_id in zip(local_founders, local_ids):
                if float(unit[i] @ unit[f]) >= threshold:
                    assignment[i] = out_id
                    break
            else:
                local_founders.append(i)
                local_ids.append(n_out)
                founders.append(i)
                assignment[i] = n_out
                n_out += 1

    counts = np.bincount(assignment, minlength=n_out).astype(np.float32)
    out_feats = np.zeros((n_out, feats.shape[1]), np.float64)
    np.add.at(out_feats, assignment, feats)
    out_pos = np.zeros((n_out, 2), np.float64)
    np.add.at(out_pos, assignment, grid.astype(np.float64))
    out_feats /= counts[:, None]
    out_pos /= counts[:, None]
    return MergedTokens(out_feats.astype(np.float32), out_pos.astype(np.float32), counts, assignment)
