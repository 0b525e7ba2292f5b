"""GPU benchmark of the MoNE kernels: ``python -m launcher.bench.mone_kernels [--quick]``.

For realistic expert shapes (bf16, keep_ratio 0.5) it prints time per call and ratios of the Triton path
against the torch MoNE reference and against a dense SwiGLU expert (torch/cuBLAS):
- training: E local experts, T tokens each, forward + backward (L2 flushed between calls, ``do_bench``);
- decode: E local experts with 1 or 4 tokens each, forward under no_grad, every variant captured in a CUDA
  graph (``do_bench_cudagraph``) so launch overhead does not decide the result. Also the same kernels at
  keep_ratio 1.0 (same launches, all weights read) and the achieved weight-read bandwidth.
Goals (docs/benchmarks.md): training overhead <= 5% over dense; decode >= 1.3x faster than dense.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as Fn

from kernels.mone import mone_swiglu_grouped, mone_swiglu_reference
from kernels.mone_decode import mone_decode, row_starts
from moe_core.mone import keep_count

SHAPES = [(2048, 1024), (2048, 1408), (4096, 2816)]  # (hidden D, expert width F)


def dense_experts(x_ND, splits, w_gate_EFD, w_up_EFD, w_down_EDF):
    outs = [Fn.linear(Fn.silu(Fn.linear(x, w_gate_EFD[e])) * Fn.linear(x, w_up_EFD[e]), w_down_EDF[e])
            for e, x in enumerate(torch.split(x_ND, splits))]
    return torch.cat(outs)


def _weights(E, D, F, requires_grad):
    def w(*shape):
        return (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) / shape[-1] ** 0.5).requires_grad_(
            requires_grad)
    return w(E, F, D), w(E, F, D), w(E, D, F)


def bench_training(D, F, E, T, keep):
    import triton.testing as tt

    splits = [T] * E
    x = torch.randn(E * T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ws = _weights(E, D, F, True)
    dy = torch.randn_like(x)
    k = keep_count(keep, F)
    fns = {
        "triton": lambda: mone_swiglu_grouped(x, splits, *ws, k),
        "torch_ref": lambda: mone_swiglu_reference(x, splits, *ws, k),
        "dense": lambda: dense_experts(x, splits, *ws),
    }
    ms = {name: tt.do_bench(lambda f=f: f().backward(dy), grad_to_none=[x, *ws], rep=200) for name, f in fns.items()}
    print(f"train  D={D:5d} F={F:5d} E={E} T/expert={T:5d} k={k:5d} | triton {ms['triton']:.3f} ms  "
          f"torch_ref {ms['torch_ref']:.3f} ms  dense {ms['dense']:.3f} ms | triton/dense {ms['triton'] / ms['dense']:.3f}"
          f"  torch_ref/triton {ms['torch_ref'] / ms['triton']:.2f}x", flush=True)


def bench_decode(D, F, E, T, keep):
    import triton.testing as tt

    splits = [T] * E
    x = torch.randn(E * T, D, device="cuda", dtype=torch.bfloat16)
    ws = _weights(E, D, F, False)
    k = keep_count(keep, F)
    starts = row_starts(splits, x.device)
    fns = {
        "triton": lambda: mone_decode(x, starts, *ws, k, "post_act"),
        "triton_k=F": lambda: mone_decode(x, starts, *ws, F, "post_act"),
        "torch_ref": lambda: mone_swiglu_reference(x, splits, *ws, k),
        "dense": lambda: dense_experts(x, splits, *ws),
    }
    with torch.no_grad():
        y, y_ref = fns["triton"](), fns["torch_ref"]()
        err = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
        ms = {name: tt.do_bench_cudagraph(f, rep=100) for name, f in fns.items()}
    weight_bytes = 3 * E * F * D * 2
    read = weight_bytes * (2 / 3 + 1 / 3 * keep) if T == 1 else float("nan")  # W_gate, W_down in full; kept W_up
    print(f"decode D={D:5d} F={F:5d} E={E} T/expert={T:2d} k={k:5d} | triton {ms['triton'] * 1e3:.1f} us  "
          f"triton_k=F {ms['triton_k=F'] * 1e3:.1f} us  torch_ref {ms['torch_ref'] * 1e3:.1f} us  dense "
          f"{ms['dense'] * 1e3:.1f} us | dense/triton {ms['dense'] / ms['triton']:.2f}x  "
          f"torch_ref/triton {ms['torch_ref'] / ms['triton']:.2f}x  k=F/triton {ms['triton_k=F'] / ms['triton']:.2f}x"
          f" | triton {read / ms['triton'] / 1e6:.0f} GB/s, dense {weight_bytes / ms['dense'] / 1e6:.0f} GB/s"
          f" | rel err vs ref {err:.1e}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape only")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU (the kernels' CPU interpreter mode is for tests only)")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    shapes = SHAPES[1:2] if args.quick else SHAPES
    for D, F in shapes:
        bench_training(D, F, E=4, T=4096, keep=args.keep_ratio)
    for D, F in shapes:
        for T in (1, 4):
            bench_decode(D, F, E=16, T=T, keep=args.keep_ratio)


if __name__ == "__main__":
    main()
