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


CHUNK_ELEMENTS = 1 << 16  # block members x feature width handled at once: bounds the temporaries (~1 MB of
# float32 and float64), whatever the slide's tile count and the encoder's width


def merge_tokens(features: np.ndarray, grid_index: np.ndarray, window: int = 2, threshold: float = 0.95,
                 enabled: bool = True, chunk_elements: int = CHUNK_ELEMENTS) -> MergedTokens:
    """Merge `features` (N, D) on the tile grid `grid_index` (N, 2). Blocks are handled a chunk at a time, so the
    memory beside the output is a few integer arrays of length N and one chunk's temporaries (a 100k-tile slide
    of a 1024-wide encoder would otherwise hold several copies of its 400 MB of features)."""
    feats = np.asarray(features, dtype=np.float32)
    grid = np.asarray(grid_index, dtype=np.int64)
    n = len(feats)
    if feats.ndim != 2 or grid.shape != (n, 2):
        raise ValueError(f"merge_tokens: features (N, D) and grid_index (N, 2) expected, got {feats.shape}, {grid.shape}")
    if n == 0:
        return MergedTokens(feats, np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    if not enabled or window <= 1:
        return MergedTokens(feats.copy(), grid.astype(np.float32), np.ones(n, np.float32), np.arange(n))

    block = grid // window
    order = np.lexsort((np.arange(n), block[:, 0], block[:, 1]))  # row-major blocks, stable inside
    sb = block[order]
    del block
    starts = np.flatnonzero(np.r_[True, np.any(sb[1:] != sb[:-1], axis=1)])
    del sb
    sizes = np.diff(np.r_[starts, n])

    # slots[b, k]: the k-th member (input order) of block b, -1 where the block has fewer members
    k_max = int(sizes.max())
    slots = np.full((len(starts), k_max), -1, np.int64)
    slots[np.repeat(np.arange(len(starts)), sizes), np.arange(n) - np.repeat(starts, sizes)] = order
    del order
    valid = slots >= 0
    step = max(1, chunk_elements // (k_max * max(1, feats.shape[1])))
    chunks = [slice(a, min(a + step, len(starts))) for a in range(0, len(starts), step)]

    # the greedy pass, vectorised over the blocks of a chunk: member k joins the first earlier founder it matches
    founder = np.zeros_like(valid)
    joins = np.zeros(slots.shape, np.int64)  # slot of the founder each member belongs to
    for c in chunks:
        s, v = slots[c], valid[c]
        u = feats[np.where(v, s, 0)]
        u /= np.maximum(np.linalg.norm(u, axis=2, keepdims=True), 1e-12)
        u *= v[..., None]
        sim = np.einsum("bkd,bjd->bkj", u, u)  # within-block cosine similarities
        for k in range(k_max):
            match = (sim[:, k, :k] >= threshold) & founder[c, :k]
            has = match.any(axis=1)
            first = np.argmax(match, axis=1) if k else np.zeros(len(s), np.int64)
            founder[c, k] = v[:, k] & ~has
            joins[c, k] = np.where(has, first, k)

    # output ids: founders in block order, then slot order (as the token order the model was trained with)
    fid = np.cumsum(founder.ravel()).reshape(founder.shape) - 1
    n_out = int(founder.sum())
    assignment = np.empty(n, np.int64)
    rows = np.nonzero(valid)
    assignment[slots[rows]] = fid[rows[0], joins[rows]]
    del rows, fid, joins, founder
    counts = np.bincount(assignment, minlength=n_out).astype(np.float32)

    # the mean of each token's members, summed in float64 in slot order; a chunk's tokens are one id range
    out_feats = np.empty((n_out, feats.shape[1]), np.float32)
    out_pos = np.empty((n_out, 2), np.float32)
    for c in chunks:
        s, v = slots[c], valid[c]
        first_member = s[:, 0]  # slot 0 of every block is a member, and founds the block's first token
        lo = int(assignment[first_member[0]])
        hi = int(assignment[s[-1][v[-1]]].max()) + 1
        acc = np.zeros((hi - lo, feats.shape[1]), np.float64)
        pos = np.zeros((hi - lo, 2), np.float64)
        for k in range(k_max):  # one member per block per slot: no repeated target inside one update
            members = s[v[:, k], k]
            target = assignment[members] - lo
            acc[target] += feats[members]
            pos[target] += grid[members]
        acc /= counts[lo:hi, None]
        pos /= counts[lo:hi, None]
        out_feats[lo:hi] = acc
        out_pos[lo:hi] = pos
    return MergedTokens(out_feats, out_pos, counts, assignment)
