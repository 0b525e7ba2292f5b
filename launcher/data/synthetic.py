"""``data.source: synthetic``: a fixed random Markov chain over ``model.vocab_size`` (each token has 4 possible
successors with probabilities ``MARKOV_PROBS``), so a tiny model's loss falls towards the chain's entropy
(:func:`markov_entropy_nats`). Batch ``b`` of a rank is a pure function of ``(seed, split, dp_rank, b)``, generated
in the calling process (``data.num_workers`` is not used)."""
from __future__ import annotations

import numpy as np
import torch

from launcher.data.batch import SPLIT_CODES, Batch, derive_seed

MARKOV_PROBS = (0.55, 0.25, 0.12, 0.08)


def markov_entropy_nats() -> float:
    """Per-token entropy of the synthetic chain: the lowest loss a model can reach on it."""
    p = np.asarray(MARKOV_PROBS)
    return float(-(p * np.log(p)).sum())


class SyntheticSource:
    """Deterministic Markov-chain batches; the same chain on every rank, a different stream per rank/split."""

    def __init__(self, vocab_size: int, seq_length: int, micro_batch_size: int, seed: int, split: str,
                 dp_rank: int):
        chain_rng = np.random.default_rng(derive_seed(seed, 0x3A7C))
        self.successors_VK = chain_rng.integers(0, vocab_size, size=(vocab_size, len(MARKOV_PROBS)))
        self.cum_probs_K = np.cumsum(MARKOV_PROBS)
        self.shape = (micro_batch_size, seq_length + 1)
        self.vocab_size = vocab_size
        self.key = (seed, SPLIT_CODES[split], dp_rank)

    def batch(self, index: int) -> Batch:
        rng = np.random.default_rng(derive_seed(*self.key, index))
        B, S1 = self.shape
        choice_BS = np.minimum(np.searchsorted(self.cum_probs_K, rng.random((B, S1 - 1))), len(MARKOV_PROBS) - 1)
        seq_BS = np.empty((B, S1), dtype=np.int64)
        seq_BS[:, 0] = rng.integers(0, self.vocab_size, size=B)
        for t in range(1, S1):
            seq_BS[:, t] = self.successors_VK[seq_BS[:, t - 1], choice_BS[:, t - 1]]
        seq = torch.from_numpy(seq_BS)
        return {"tokens": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous(),
                "loss_mask": torch.ones(B, S1 - 1, dtype=torch.float32)}
