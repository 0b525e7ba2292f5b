"""Matryoshka MoE (arXiv 2509.26520): which k each MoE layer routes with, per step, in training and evaluation.

Training with ``moe.matryoshka.enabled``: every layer draws its own ``k`` from ``[k_min, k_max]`` each step, either
uniformly or capacity-aware ``P(k) ∝ exp(log(k) / tau) = k^(1/tau)`` (tau -> inf tends to uniform, small tau
favours large k; computed as a softmax of ``log(k) / tau``, so any tau > 0 is finite). The draw uses Python's
``random.Random`` (Mersenne Twister, stable across Python versions) seeded from a SHA-256 of ``(seed, step,
layer_idx)``, so every rank (TP/EP/DP/PP), every micro-batch of a step and any activation recomputation agree
without communicating (Python's ``hash()`` is salted per process and is never used). It runs on the host and
touches no tensor, so it never waits for the device. Without Matryoshka, ``k = top_k``. The step comes from
``MoELayer.set_step`` (the trainer calls it every step; see moe_core/layer.py for a loop that does not).

Evaluation/inference k (elastic inference), in order: :meth:`KSchedule.set_eval_k` if called with a value, else
``moe.matryoshka.eval_k``, else ``k_max`` when Matryoshka is on, else ``top_k``. A list gives one k per MoE layer,
indexed by the layer's position among MoE layers (see ``moe_layers``). A k outside the trained range
(``[k_min, k_max]``, or ``top_k`` without Matryoshka) is allowed (elastic inference) but warns once per value,
naming the trained range: the model never routed with it.
"""
from __future__ import annotations

import hashlib
import random
import warnings
from typing import Optional, Sequence, Union

import torch

from moe_core.config import MoEConfig, check_eval_k

EvalK = Optional[Union[int, Sequence[int]]]


def stable_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on ``keys`` (identical in every process, run and Python version)."""
    digest = hashlib.sha256(":".join(str(int(k)) for k in keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def k_probabilities(k_min: int, k_max: int, distribution: str, tau: float) -> torch.Tensor:
    """fp64 ``P(k)`` for ``k = k_min..k_max``, always on the CPU (it feeds a CPU generator; the model may be
    being built on the meta device or live on a GPU). ``capacity``: ``softmax(log(k) / tau)`` (log space: the
    direct ``k^(1/tau)`` overflows fp64 for small tau, e.g. tau = 0.005, k = 64 gives inf / inf = NaN)."""
    ks = torch.arange(k_min, k_max + 1, dtype=torch.float64, device="cpu")
    if distribution == "uniform":
        return torch.full_like(ks, 1.0 / ks.numel())
    if distribution == "capacity":
        if not tau > 0:
            raise ValueError(f"moe.matryoshka.tau must be > 0, got {tau}")
        return torch.softmax(torch.log(ks) / tau, dim=0)
    raise ValueError(f"moe.matryoshka.distribution must be 'uniform' or 'capacity', got {distribution!r}")


class KSchedule:
    """``k_for(layer_idx, step, training) -> int``; shared by all MoE layers of a model.

    ``moe_layers``: the layer indices that are MoE layers, in order (as passed to ``MoELayer(layer_idx=...)``);
    a list ``eval_k`` is indexed by position in it. ``None`` means ``layer_idx`` already is the MoE-layer position.
    """

    def __init__(self, moe_cfg: MoEConfig, seed: int, moe_layers: Optional[Sequence[int]] = None):
        self.cfg, self.seed = moe_cfg, seed
        self.moe_layers = list(moe_layers) if moe_layers is not None else None
        self._positions = {idx: pos for pos, idx in enumerate(self.moe_layers or ())}
        """MoE-layer position of each MoE layer index (a dict: a list's index() is O(layers) per call)."""
        mm = moe_cfg.matryoshka
        mm.validate(moe_cfg.num_experts)
        if mm.enabled:
            self._weights_K = k_probabilities(mm.k_min, mm.k_max, mm.distribution, mm.tau).tolist()
        self._eval_k_override: EvalK = None
        self._warned_eval_k: set[int] = set()
        self._check_eval_k(mm.eval_k, "moe.matryoshka.eval_k")

    def set_eval_k(self, k: EvalK) -> None:
        """Elastic inference: one k for every MoE layer, a list with one k per MoE layer, or None (config default)."""
        self._check_eval_k(k, "eval k")
        self._eval_k_override = list(k) if isinstance(k, (list, tuple)) else k

    def k_for(self, layer_idx: int, step: int, training: bool) -> int:
        if training:
            return self._draw(layer_idx, step) if self.cfg.matryoshka.enabled else self.cfg.top_k
        eval_k = self._eval_k_override if self._eval_k_override is not None else self.cfg.default_eval_k
        if isinstance(eval_k, int):
            return eval_k
        pos = self._position(layer_idx)
        if pos >= len(eval_k):
            raise ValueError(f"eval k list has {len(eval_k)} entries but MoE layer position {pos} was asked for; "
                             "give one k per MoE layer")
        return eval_k[pos]

    def _draw(self, layer_idx: int, step: int) -> int:
        rng = random.Random(stable_seed(self.seed, step, layer_idx))
        return self.cfg.matryoshka.k_min + rng.choices(range(len(self._weights_K)), weights=self._weights_K)[0]

    def _position(self, layer_idx: int) -> int:
        if self.moe_layers is None:
            return layer_idx
        if layer_idx not in self._positions:
            raise ValueError(f"layer {layer_idx} is not among the MoE layers {self.moe_layers}")
        return self._positions[layer_idx]

    def _check_eval_k(self, k: EvalK, name: str) -> None:
        check_eval_k(k, self.cfg.num_experts, None if self.moe_layers is None else len(self.moe_layers), name)
        if k is None:
            return
        ks = list(k) if isinstance(k, (list, tuple)) else [k]
        lo, hi = self.trained_k_range()
        for v in sorted(set(ks) - set(range(lo, hi + 1)) - self._warned_eval_k):
            self._warned_eval_k.add(v)
            trained = f"k in [{lo}, {hi}] (moe.matryoshka.k_min/k_max)" if self.cfg.matryoshka.enabled else \
                f"k = {lo} (moe.top_k)"
            warnings.warn(f"{name}: k={v} is outside what this model was trained with, {trained}; it never routed "
                          f"with k={v}, so expect lower quality", stacklevel=3)

    def trained_k_range(self) -> tuple[int, int]:
        """``(k_min, k_max)`` with Matryoshka, else ``(top_k, top_k)``: the k values training routes with."""
        mm = self.cfg.matryoshka
        return (mm.k_min, mm.k_max) if mm.enabled else (self.cfg.top_k, self.cfg.top_k)
