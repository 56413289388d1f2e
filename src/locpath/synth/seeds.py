"""Seeds of the synthetic world's splits: slide i of split s is SeedSequence([base_seed, split_id, i]), so
training, evaluation and encoder-pretraining slides never coincide whatever the seeds asked for."""

from __future__ import annotations

import numpy as np

SPLITS = {"train": 1, "eval": 2, "encoder": 3}


def split_seed(base: int, split: str, index: int) -> int:
    return int(np.random.SeedSequence([int(base), SPLITS[split], int(index)]).generate_state(1)[0])
