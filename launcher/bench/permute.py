"""GPU benchmark of the fused permute/unpermute kernels: ``python -m launcher.bench.permute [--tokens 16384 ...]``.

Times permute -> unpermute, forward + backward (``y_TD = unpermute(permute(x_TD))``, then ``y_TD.backward``),
the way an MoE layer chains them around its experts, with ``triton.testing.do_bench``, for:
- ``triton``: kernels/permute.py's Triton kernels (what CUDA training runs);
- ``torch``: the torch reference of identical semantics, eager;
- ``torch_compiled``: the same reference under ``torch.compile`` (the strongest torch baseline).
The permutation comes from moe_core/permute.py (``make_permutation``) for random top-K routing, optionally with a
share of the slots dropped. Prints ms per variant, the ratios, the Triton path's effective bandwidth (bytes the
four passes must move at least) and the largest difference between the paths. Default shape: T=16384 tokens,
K=2, D=2048, bf16, 64 experts (docs/benchmarks.md). CUDA only: elsewhere it prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import sys

import torch

from kernels.permute import permute_rows, unpermute_rows
from launcher.errors import ArgumentParser, UsageError, report
from moe_core.permute import make_permutation

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m launcher.bench.permute", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384, help="T, tokens per MoE layer call")
    p.add_argument("--topk", type=int, default=2, help="K, experts per token")
    p.add_argument("--hidden", type=int, default=2048, help="D, hidden size")
    p.add_argument("--experts", type=int, default=64, help="E, experts the tokens are routed over")
    p.add_argument("--drop", type=float, default=0.0, help="share of routing slots dropped (capacity), in [0, 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per variant, ms")
    args = p.parse_args(argv)
    if not (args.tokens > 0 and 1 <= args.topk <= args.experts and args.hidden > 0 and 0 <= args.drop < 1):
        p.error("need --tokens > 0, 1 <= --topk <= --experts, --hidden > 0 and 0 <= --drop < 1")
    return args


def make_inputs(T: int, K: int, D: int, E: int, drop: float, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """Tokens ``x_TD``, fp32 router weights ``w_TK`` (0 on dropped slots), output gradient ``dy_TD`` and the
    permutation maps of random top-K routing with about ``drop`` of the slots dropped."""
    gen = torch.Generator(device=device).manual_seed(seed)
    scores_TE = torch.rand(T, E, device=device, generator=gen)
    weight_TK, idx_TK = scores_TE.topk(K, dim=1)
    dropped_TK = torch.rand(T, K, device=device, generator=gen) < drop
    perm = make_permutation(torch.where(dropped_TK, -1, idx_TK), E)
    return dict(x_TD=torch.randn(T, D, device=device, dtype=dtype, generator=gen).requires_grad_(),
                w_TK=torch.where(dropped_TK, 0.0, weight_TK / weight_TK.sum(1, keepdim=True)).requires_grad_(),
                dy_TD=torch.randn(T, D, device=device, dtype=dtype, generator=gen),
                maps=(perm.row_TK, perm.token_idx_N, perm.slot_idx_N))


def chain(x_TD, w_TK, maps, use_triton: bool) -> torch.Tensor:
    """permute -> unpermute (the experts left out: their cost is not what is measured here)."""
    row_TK, token_idx_N, slot_idx_N = maps
    x_ND = permute_rows(x_TD, token_idx_N, row_TK, use_triton)
    return unpermute_rows(x_ND, w_TK, row_TK, token_idx_N, slot_idx_N, use_triton)


def forward_backward(fn, inputs: dict) -> list[torch.Tensor]:
    """Output and the gradients of x and w (fresh ones each call)."""
    x_TD, w_TK = inputs["x_TD"], inputs["w_TK"]
    x_TD.grad = w_TK.grad = None
    y_TD = fn(x_TD, w_TK, inputs["maps"])
    y_TD.backward(inputs["dy_TD"])
    return [y_TD.detach(), x_TD.grad, w_TK.grad]


def min_bytes(T: int, K: int, D: int, itemsize: int) -> int:
    """Bytes the four passes must move at least: permute fwd 2N rows, unpermute fwd N+T, unpermute bwd T+2N,
    permute bwd N+T (N = T*K rows of D elements; index and weight traffic left out)."""
    return (6 * T * K + 3 * T) * D * itemsize


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        return report(UsageError("this benchmark needs a CUDA GPU (the Triton interpreter on CPU is for tests only); "
                                 "run it on a GPU machine"))
    import triton.testing as tt

    dtype = DTYPES[args.dtype]
    inputs = make_inputs(args.tokens, args.topk, args.hidden, args.experts, args.drop, dtype, "cuda")
    compiled = torch.compile(lambda x, w, maps: chain(x, w, maps, False), fullgraph=True)
    fns = {"triton": lambda x, w, maps: chain(x, w, maps, True),
           "torch": lambda x, w, maps: chain(x, w, maps, False),
           "torch_compiled": compiled}
    results = {name: forward_backward(fn, inputs) for name, fn in fns.items()}  # also warms up / compiles
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(results["triton"], results["torch"]))
    ms = {name: tt.do_bench(lambda fn=fn: forward_backward(fn, inputs), rep=args.rep_ms) for name, fn in fns.items()}
    gbps = min_bytes(args.tokens, args.topk, args.hidden, dtype.itemsize) / ms["triton"] / 1e6
    print(f"{torch.cuda.get_device_name()} | permute+unpermute fwd+bwd T={args.tokens} K={args.topk} "
          f"D={args.hidden} E={args.experts} drop={args.drop} {args.dtype} | triton {ms['triton']:.3f} ms  "
          f"torch {ms['torch']:.3f} ms  torch_compiled {ms['torch_compiled']:.3f} ms | "
          f"torch/triton {ms['torch'] / ms['triton']:.2f}x  torch_compiled/triton "
          f"{ms['torch_compiled'] / ms['triton']:.2f}x | triton {gbps:.0f} GB/s | max |triton - torch| {err:.2e}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
