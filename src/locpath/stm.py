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
    sizes = np.diff(np.r_[starts, n])

    # slots[b, k]: the k-th member (input order) of block b, -1 where the block has fewer members
    k_max = int(sizes.max())
    slot_of = np.arange(n) - np.repeat(starts, sizes)
    block_of = np.repeat(np.arange(len(starts)), sizes)
    slots = np.full((len(starts), k_max), -1, np.int64)
    slots[block_of, slot_of] = order
    valid = slots >= 0
    u = unit[np.where(valid, slots, 0)] * valid[..., None]
    sim = np.einsum("bkd,bjd->bkj", u, u)  # within-block cosine similarities

    # the greedy pass, vectorised over blocks: member k joins the first earlier founder it matches
    founder = np.zeros_like(valid)
    joins = np.zeros(slots.shape, np.int64)  # slot of the founder each member belongs to
    for k in range(k_max):
        match = (sim[:, k, :k] >= threshold) & founder[:, :k]
        has = match.any(axis=1)
        first = np.argmax(match, axis=1) if k else np.zeros(len(starts), np.int64)
        founder[:, k] = valid[:, k] & ~has
        joins[:, k] = np.where(has, first, k)

    # output ids: founders in block order, then slot order (as the token order the model was trained with)
    fid = np.cumsum(founder.ravel()).reshape(founder.shape) - 1
    n_out = int(founder.sum())
    assignment = np.empty(n, np.int64)
    rows = np.nonzero(valid)
    assignment[slots[rows]] = fid[rows[0], joins[rows]]

    counts = np.bincount(assignment, minlength=n_out).astype(np.float32)
    out_feats = np.zeros((n_out, feats.shape[1]), np.float64)
    out_pos = np.zeros((n_out, 2), np.float64)
    for k in range(k_max):  # one member per block per slot: no repeated target inside one update
        members = slots[valid[:, k], k]
        target = assignment[members]
        out_feats[target] += feats[members]
        out_pos[target] += grid[members]
    out_feats /= counts[:, None]
    out_pos /= counts[:, None]
    return MergedTokens(out_feats.astype(np.float32), out_pos.astype(np.float32), counts, assignment)
