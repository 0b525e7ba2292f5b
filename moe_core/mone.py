"""MoNE: Mixture of Neuron Experts (arXiv 2510.05781) - neuron selection inside each routed expert.

KERNEL CONTRACT (kernels/mone.py must export a function with exactly this signature and semantics)::

    mone_swiglu_grouped(x_ND, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF, keep_k, score) -> y_ND

    x_ND               [N, D]  token rows grouped by expert (rows of expert 0 first, then expert 1, ...), then
                       dead rows (capacity-dropped slots) whose outputs are unspecified
    tokens_per_expert_E  int64 tensor [E] on x's device, sums to <= N (entries may be 0); implementations must not
                       read it on the host in training (no device-to-host sync)
    w_gate_EFD         [E, F, D]   w_up_EFD [E, F, D]   w_down_EDF [E, D, F]   (same dtype/device as x_ND)
    keep_k             int in [1, F]: neurons kept per row (:func:`keep_count`)
    score              "post_act" -> rank neurons by |silu(W_gate x)|, "pre_act" -> by |W_gate x|
    y_ND               [N, D], dtype of x_ND

    For row n of expert e:  g = W_gate[e] x_n (the GEMM output, rounded to the activation dtype),
                            u = W_up[e] x_n,  keep = SELECT(g, keep_k, score) (below),
                            h_f = silu(g_f) * u_f if keep_f else exactly 0,   y_n = W_down[e] h
    The function must be differentiable w.r.t. x_ND and the three weights (the selection is not differentiated).

NEURON SELECTION - the one definition. The torch path here, the Triton training path (kernels/select_swiglu.py
with the cut of kernels/topk_select.py), the Triton decode path (kernels/mone_decode.py), the FP8 path
(parallel/fp8/experts.py) and the exported Hugging Face code (launcher/hf/modeling_moetron.py) all follow it:

1. Score, in fp32, from the rounded ``g``: ``s_f = |g_f|`` (pre_act) or ``s_f = |silu(g_f)|`` with
   ``silu(g) = g * sigmoid(g)`` evaluated in fp32 (post_act). No score is computed in bf16/fp16.
2. Order: larger ``s`` first; ``+inf`` above every finite score; NaN BELOW every number (a NaN neuron is kept only
   when its row has fewer than ``keep_k`` non-NaN scores); among equal scores the LOWER neuron index first. This
   is a total order, so the kept set is unique however many exact ties bf16 produces.
3. ``keep`` = the first ``keep_k`` neurons of that order.
4. Masking is selection, never multiplication: dropped neurons enter ``h`` as exact zeros (``torch.where`` /
   ``tl.where`` on the inputs of the SwiGLU product), so they contribute exactly 0 to ``y`` and receive exactly 0
   gradient even where their ``g`` or ``u`` is inf or NaN (``inf * 0`` would be NaN).

Paths agree bit for bit on the selection given the same ``g``; the one caveat is post_act, where two devices'
fp32 ``sigmoid`` may differ in the last bit, which can only reorder two DIFFERENT ``g`` values whose fp32 scores
are within one ulp (pre_act is exact everywhere). Which ``g`` each path computes is a GEMM matter (accumulation
order), outside the selection.

:func:`mone_swiglu_torch` is the pure-torch implementation of the contract (and the reference for the kernels). It
masks the dense hidden activations, so training saves no FLOPs; savings come from kernels that gather only the
kept rows of W_up / columns of W_down. The torch selection is one ``torch.topk`` over distinct int64 keys
``(score bits, -index)``: a partial selection (no full sort) whose result does not depend on topk's tie order.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Callable

import torch

from kernels.grouped_gemm import group_of_rows, grouped_linear
from moe_core.config import MoNEConfig
from moe_core.grouped import NeuronSelect, masked_swiglu, swiglu_grouped
from moe_core.layers import LayerFactory, SwiGLUMLP

MoNEFn = Callable[..., torch.Tensor]
SCORES = ("post_act", "pre_act")
_NAN_BITS = -1  # NaN sorts below |score| = 0 (bit pattern 0)


def keep_count(keep_ratio: float, ffn: int) -> int:
    """Neurons kept per row: ``keep_ratio * F`` rounded half up, clamped to ``[1, F]``.

    Exact rational arithmetic on the ratio as written: the float is read as the shortest decimal that round-trips
    (``repr``, what a recipe says: 0.29 is 29/100, not the binary 0.28999999999999998), so 0.29 * 50 = 14.5 gives
    15. Raises ValueError unless ``0 < keep_ratio <= 1``.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"moe.mone.keep_ratio must be in (0, 1], got {keep_ratio}")
    kept = int(Fraction(repr(float(keep_ratio))) * ffn + Fraction(1, 2))  # int() floors a positive Fraction
    return max(1, min(ffn, kept))


def neuron_score(pre_act_NF: torch.Tensor, score: str) -> torch.Tensor:
    """fp32 ranking score (step 1 of the selection): ``|silu(g)|`` (post_act) or ``|g|`` (pre_act), from ``g`` as
    given (the rounded GEMM output); differentiable."""
    g_NF = pre_act_NF.float()
    if score == "post_act":
        return (g_NF * torch.sigmoid(g_NF)).abs()
    if score == "pre_act":
        return g_NF.abs()
    raise ValueError(f"moe.mone.score must be one of {list(SCORES)}, got {score!r}")


@torch.no_grad()
def select_neurons(pre_act_NF: torch.Tensor, keep_k: int, score: str) -> torch.Tensor:
    """bool ``[N, F]``: the ``keep_k`` neurons of each row chosen by the selection in the module docstring."""
    F = pre_act_NF.shape[-1]
    if not 1 <= keep_k <= F:
        raise ValueError(f"keep_k={keep_k} must be in [1, F={F}]")
    score_NF = neuron_score(pre_act_NF, score)
    bits_NF = torch.where(score_NF.isnan(), _NAN_BITS, score_NF.view(torch.int32)).to(torch.int64)
    # fp32 |s| bit patterns are monotone in |s|; appending (F - 1 - f) makes every key distinct, lower f larger
    key_NF = bits_NF * (1 << 32) + torch.arange(F - 1, -1, -1, device=pre_act_NF.device)
    keep_idx_NK = torch.topk(key_NF, keep_k, dim=-1, sorted=False).indices
    return torch.zeros(score_NF.shape, dtype=torch.bool, device=pre_act_NF.device).scatter_(-1, keep_idx_NK, True)


def neuron_selector(keep_k: int, score: str) -> NeuronSelect:
    """The selection of the module docstring as a ``select(pre_act_NF) -> keep_NF`` for
    :func:`moe_core.grouped.swiglu_grouped`."""
    return lambda pre_act_NF: select_neurons(pre_act_NF, keep_k, score)


def mone_swiglu_torch(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, w_gate_EFD: torch.Tensor,
                      w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor, keep_k: int, score: str) -> torch.Tensor:
    """Pure-torch implementation of the kernel contract in this module's docstring."""
    return swiglu_grouped(x_ND, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF, neuron_selector(keep_k, score))


def neuron_balance_stats(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, w_gate_EFD: torch.Tensor,
                         keep_k: int, score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-expert sums the neuron balance loss is made of, ``(kept_EF, share_EF)`` (fp32 ``[E, F]``): kept
    slots per neuron (integer valued, no gradient) and the sum over rows of each neuron's share of its row's total
    score (differentiable w.r.t. ``x_ND`` and ``w_gate_EFD``). Dead rows do not count. Both are sums over rows, so
    the sums of any split of an expert's rows add up to the sums of all of them (LLEP splits an expert's rows over
    ranks). It recomputes the gate GEMM: one extra ``N x D x F`` GEMM (and works with any kernel backend)."""
    pre_act_NF = grouped_linear(x_ND, w_gate_EFD, tokens_per_expert_E)
    score_NF = neuron_score(pre_act_NF, score)
    mask_NF = select_neurons(pre_act_NF, keep_k, score).float()
    share_NF = score_NF / score_NF.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    E = tokens_per_expert_E.shape[0]
    # each row's expert; dead rows land in bucket E, which is dropped (so garbage there cannot leak)
    expert_N = group_of_rows(tokens_per_expert_E.cumsum(0), x_ND.shape[0])
    kept_EF = score_NF.new_zeros(E + 1, score_NF.shape[1]).index_add(0, expert_N, mask_NF)[:E]
    share_EF = share_NF.new_zeros(E + 1, share_NF.shape[1]).index_add(0, expert_N, share_NF)[:E]
    return kept_EF, share_EF


def neuron_balance_per_expert(kept_EF: torch.Tensor, share_EF: torch.Tensor, rows_E: torch.Tensor,
                              keep_k: int) -> torch.Tensor:
    """fp32 ``[E]``: ``F * sum_i f_i * p_i`` per expert from the sums of :func:`neuron_balance_stats`, with
    ``f_i = kept_i / (rows * keep_k)`` and ``p_i = share_i / rows`` (0 for an expert with no rows). ``kept_EF`` and
    ``rows_E`` (int64) must be the expert's totals over all its rows; ``share_EF`` may be the sum over a subset of
    them, as the result is linear in it (the subsets' results add up to the whole's)."""
    rows_E1 = rows_E.clamp_min(1).unsqueeze(1).float()
    return share_EF.shape[1] * (kept_EF / (rows_E1 * keep_k) * (share_EF / rows_E1)).sum(-1)


def neuron_balance_loss(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, w_gate_EFD: torch.Tensor,
                        keep_k: int, score: str) -> torch.Tensor:
    """Switch-style load balance over the neurons of each expert (our choice; the paper leaves it open).

    Per expert e with n > 0 rows: ``F * sum_i f_i * p_i`` where ``f_i`` is the fraction of the ``n * keep_k``
    kept slots that went to neuron i (counts, no gradient) and ``p_i`` the mean over rows of neuron i's share of
    the row's total score (differentiable). It is 1.0 when every neuron is kept equally often with equal shares;
    the result is the mean over experts that received rows (0 if none); dead rows do not count. Computed in fp32,
    no host sync. Built from :func:`neuron_balance_stats` and :func:`neuron_balance_per_expert` (LLEP uses those
    to compute the same loss from an expert's rows split over ranks).
    """
    kept_EF, share_EF = neuron_balance_stats(x_ND, tokens_per_expert_E, w_gate_EFD, keep_k, score)
    loss_E = neuron_balance_per_expert(kept_EF, share_EF, tokens_per_expert_E, keep_k)
    has_rows_E = tokens_per_expert_E > 0
    return torch.where(has_rows_E, loss_E, 0.0).sum() / has_rows_E.sum().clamp_min(1)


class MoNESwiGLUMLP(SwiGLUMLP):
    """The shared expert with MoNE (``moe.mone.shared_experts``): :class:`~moe_core.layers.SwiGLUMLP` (same
    parameters and names) whose hidden activations keep, per token, only the top ``keep_count(keep_ratio, ffn)``
    neurons by the MoNE score: :func:`select_neurons` on the gate output, masked by selection
    (:func:`~moe_core.grouped.masked_swiglu`), exactly as inside a routed expert. With TP each rank holds ``ffn / tp``
    of the neurons (column-parallel gate and up): the gate outputs of all ``ffn`` neurons are gathered over TP
    (``factory.tp_gather_columns``, no gradient; ``T x ffn`` activations per layer) so the selection is the
    single-device one and each rank keeps its own neurons of it."""

    def __init__(self, hidden: int, ffn: int, factory: LayerFactory, mone: MoNEConfig):
        super().__init__(hidden, ffn, factory)
        self.gather_columns, self.score = factory.tp_gather_columns, mone.score
        self.keep_k = keep_count(mone.keep_ratio, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sequence_gather(x)
        pre_act, up = self.gate_proj(x), self.up_proj(x)
        pre_act_full, start = self.gather_columns(pre_act)
        keep_full = select_neurons(pre_act_full.reshape(-1, pre_act_full.shape[-1]), self.keep_k, self.score)
        keep = keep_full[:, start:start + pre_act.shape[-1]].view(pre_act.shape)
        return self.down_proj(masked_swiglu(pre_act, up, keep))


def resolve_mone_fn(backend: str, device: torch.device) -> MoNEFn:
    """The MoNE implementation for ``moe.mone.backend`` on ``device``.

    ``torch``: :func:`mone_swiglu_torch`. ``triton``: ``kernels.mone.mone_swiglu_grouped`` (error if it cannot be
    imported). ``auto``: the Triton kernel on CUDA when ``kernels.mone`` is importable, torch otherwise.
    """
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return mone_swiglu_torch
    if backend not in ("auto", "triton"):
        raise ValueError(f"moe.mone.backend must be one of ['auto', 'torch', 'triton'], got {backend!r}")
    try:
        from kernels.mone import mone_swiglu_grouped
    except ImportError as e:
        if backend == "auto":
            return mone_swiglu_torch
        raise ImportError(f"moe.mone.backend=triton but kernels.mone cannot be imported ({e}); "
                          "install triton or set moe.mone.backend=torch") from e
    return mone_swiglu_grouped
