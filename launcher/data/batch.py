"""What every batch source shares: the batch type, the split codes and the seed derivation of the RNG keys."""
from __future__ import annotations

import numpy as np
import torch

SPLIT_CODES = {"train": 0, "valid": 1}
Batch = dict[str, torch.Tensor]


def derive_seed(*key: int) -> int:
    """One 64-bit seed from a tuple of non-negative ints (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])
