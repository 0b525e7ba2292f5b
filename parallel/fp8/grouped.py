"""Grouped FP8 GEMM for the experts (``fp8.backend=torchao``): rowwise-scaled FP8, one grouped GEMM per projection.

Shape legend: ``N`` token rows grouped by expert (rows past ``tokens_per_expert_E.sum()`` are dead rows, see
moe_core/grouped.py), ``P`` rows of the padded layout, ``E`` local experts, ``I``/``O`` a weight's input/output
width.

FP8 grouped GEMMs (``torch._scaled_grouped_mm``) need every expert's row group to start on a multiple of 16 rows.
:class:`PaddedGroups` moves the rows into a layout where group e starts at a multiple of 16, computed on the device
from the device tensor of counts, so nothing waits for the host: the padded buffer has the static size
``P = N + 16 * E`` (each group grows by at most 15 rows; dead rows go to the tail, past the last group); pad rows
are zero, so they add nothing to any product or weight gradient. The experts pad once, run gate, up and down on
the padded layout and gather the N output rows back (:meth:`PaddedGroups.unpad`).

The GEMM itself (:func:`fp8_grouped_mm`):
- CUDA: ``torchao.prototype.moe_training._to_fp8_rowwise_then_scaled_grouped_mm`` (torchao's Triton casts +
  ``torch._scaled_grouped_mm``; E4M3 operands with power-of-2 rowwise scales, forward and backward). It needs a GPU
  with FP8 tensor cores and was NOT executed on the machines this project is tested on (no GPU there).
- CPU: :func:`parallel.fp8.emulation.emulated_fp8_rowwise_grouped_mm`, the same quantisation in torch ops with a
  high-precision ``torch._grouped_mm`` (torchao's kernels and ``torch._scaled_grouped_mm`` have no CPU path), so CI
  checks the padding/offset logic and the FP8 numerics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.grouped_gemm import group_of_rows, group_offsets

ALIGN = 16              # torch._scaled_grouped_mm: group starts and the GEMM's K/N widths are multiples of 16
OUT_DTYPE = torch.bfloat16  # torch._scaled_grouped_mm writes bf16 only; results are cast back to the input dtype


@dataclass(frozen=True)
class PaddedGroups:
    """Where each of the N rows lives in the 16-aligned padded layout of ``P = N + 16 * E`` rows.

    ``dest_N`` (int64): padded row of row n (group rows keep their order; dead rows go past the last group).
    ``offs_E`` (int32): end row of each expert's padded group (``torch._scaled_grouped_mm``'s ``offs``)."""

    dest_N: torch.Tensor
    offs_E: torch.Tensor
    num_padded_rows: int

    @classmethod
    def build(cls, tokens_per_expert_E: torch.Tensor, num_rows: int) -> "PaddedGroups":
        """Index map from the device counts, without a host sync (searchsorted/cumsum on the counts' device)."""
        counts_E = tokens_per_expert_E
        padded_E = (counts_E + ALIGN - 1) // ALIGN * ALIGN
        end_E, padded_end_E = counts_E.cumsum(0), padded_E.cumsum(0)
        # row n of group e moves by (padded start - start) of e; dead rows (bucket E) move by the total padding
        shift_E1 = torch.cat([padded_end_E - padded_E - (end_E - counts_E), (padded_end_E - end_E)[-1:]])
        row_N = torch.arange(num_rows, device=counts_E.device)
        return cls(row_N + shift_E1[group_of_rows(end_E, num_rows)], group_offsets(padded_E),
                   num_rows + ALIGN * counts_E.shape[0])

    def pad(self, x_NI: torch.Tensor) -> torch.Tensor:
        """``x_PI``: rows moved to their padded place, zeros elsewhere (differentiable)."""
        return x_NI.new_zeros(self.num_padded_rows, x_NI.shape[1]).index_copy(0, self.dest_N, x_NI)

    def unpad(self, y_PO: torch.Tensor) -> torch.Tensor:
        """``y_NO``: the rows of the padded result back in the original order (differentiable)."""
        return y_PO.index_select(0, self.dest_N)


def check_aligned(name: str, w_EOI: torch.Tensor) -> None:
    """ValueError unless both GEMM widths of the expert weight ``name`` are multiples of 16."""
    if w_EOI.shape[1] % ALIGN or w_EOI.shape[2] % ALIGN:
        raise ValueError(f"FP8 experts need widths that are multiples of {ALIGN} (model.hidden_size, "
                         f"moe.expert_ffn_hidden_size); {name} is {tuple(w_EOI.shape)}")


def fp8_grouped_mm(x_PI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """``y_PO``: rows of padded group e times ``w_EOI[e].T`` in FP8 (rowwise scales), in ``x_PI``'s dtype.

    ``x_PI`` is in the padded layout (groups end at ``offs_E``, multiples of 16); rows past the last group are
    unspecified in the output. CUDA: torchao's grouped FP8 GEMM (not executed here, see module docstring); CPU: the
    emulation. Both differentiate to ``x_PI`` and ``w_EOI``."""
    w_EIO = w_EOI.transpose(-2, -1)  # [E, I, O] column-major per expert: the layout _scaled_grouped_mm wants
    if x_PI.is_cuda:
        from torchao.prototype.moe_training import (
            _to_fp8_rowwise_then_scaled_grouped_mm,
        )

        y_PO = _to_fp8_rowwise_then_scaled_grouped_mm(x_PI.contiguous(), w_EIO, offs_E, out_dtype=OUT_DTYPE,
                                                      pad_token_groups_for_grouped_mm=False)
    else:
        from parallel.fp8.emulation import emulated_fp8_rowwise_grouped_mm

        y_PO = emulated_fp8_rowwise_grouped_mm(x_PI, w_EIO, offs_E, OUT_DTYPE)
    return y_PO.to(x_PI.dtype)
