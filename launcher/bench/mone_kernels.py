"""GPU benchmark of the MoNE kernels: ``python -m launcher.bench.mone_kernels [--quick]``.

For realistic expert shapes (bf16, keep_ratio 0.5) it prints time per call and ratios of the Triton path
against the strongest dense baseline, measured side by side in one run:
- training: E local experts, T tokens each, forward + backward (L2 flushed between calls, ``do_bench``), against
  dense experts on the same grouped GEMMs (``moe_core.grouped.swiglu_grouped``: three ``torch._grouped_mm``),
  eager and with the SwiGLU fused by ``torch.compile``; the ratio is taken against the faster of the two. The
  issue-14 shape is D=2048, F=1408, 16 experts, 16384 rows;
- decode: E local experts with 1 or 4 tokens each, forward under no_grad, every variant captured in a CUDA
  graph (``do_bench_cudagraph``) so launch overhead does not decide the result. Also the same kernels at
  keep_ratio 1.0 (same launches, all weights read) and the achieved weight-read bandwidth.
Goals (docs/benchmarks.md): training <= 1.05x dense grouped; decode >= 1.3x faster than dense.
"""
from __future__ import annotations


import torch
import torch.nn.functional as Fn

from kernels.mone import mone_swiglu_grouped, mone_swiglu_reference
from kernels.mone_decode import mone_decode, row_starts
from launcher.errors import ArgumentParser, UsageError, report
from moe_core.grouped import swiglu_grouped
from moe_core.mone import keep_count, mone_swiglu_torch

SHAPES = [(2048, 1024), (2048, 1408), (4096, 2816)]  # (hidden D, expert width F)


def dense_experts(x_ND, counts_E, w_gate_EFD, w_up_EFD, w_down_EDF):
    """Per-expert cuBLAS loop (the decode baseline: a grouped GEMM has nothing to group at 1-4 rows/expert)."""
    outs = [Fn.linear(Fn.silu(Fn.linear(x, w_gate_EFD[e])) * Fn.linear(x, w_up_EFD[e]), w_down_EDF[e])
            for e, x in enumerate(torch.split(x_ND, counts_E.tolist()))]
    return torch.cat(outs)


def _weights(E, D, F, requires_grad):
    def w(*shape):
        return (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) / shape[-1] ** 0.5).requires_grad_(
            requires_grad)
    return w(E, F, D), w(E, F, D), w(E, D, F)


def bench_training(D, F, E, T, keep):
    import triton.testing as tt

    counts = torch.full((E,), T, dtype=torch.int64, device="cuda")
    x = torch.randn(E * T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ws = _weights(E, D, F, True)
    dy = torch.randn_like(x)
    k = keep_count(keep, F)
    compiled_dense = torch.compile(swiglu_grouped)
    fns = {
        "mone_triton": lambda: mone_swiglu_grouped(x, counts, *ws, k),
        "mone_torch": lambda: mone_swiglu_torch(x, counts, *ws, k, "post_act"),
        "dense_grouped": lambda: swiglu_grouped(x, counts, *ws),
        "dense_grouped_compiled": lambda: compiled_dense(x, counts, *ws),
    }
    ms = {name: tt.do_bench(lambda f=f: f().backward(dy), grad_to_none=[x, *ws], rep=200) for name, f in fns.items()}
    best_dense = min(ms["dense_grouped"], ms["dense_grouped_compiled"])
    print(f"train  D={D:5d} F={F:5d} E={E} rows={E * T} k={k:5d} | "
          + "  ".join(f"{n} {v:.3f} ms" for n, v in ms.items())
          + f" | mone_triton / best dense grouped {ms['mone_triton'] / best_dense:.3f} (goal <= 1.05)", flush=True)


def bench_decode(D, F, E, T, keep):
    import triton.testing as tt

    counts = torch.full((E,), T, dtype=torch.int64, device="cuda")
    x = torch.randn(E * T, D, device="cuda", dtype=torch.bfloat16)
    ws = _weights(E, D, F, False)
    k = keep_count(keep, F)
    starts = row_starts(counts)
    fns = {
        "triton": lambda: mone_decode(x, starts, *ws, k, "post_act"),
        "triton_k=F": lambda: mone_decode(x, starts, *ws, F, "post_act"),
        "torch_ref": lambda: mone_swiglu_reference(x, counts, *ws, k),
        "dense": lambda: dense_experts(x, counts, *ws),
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
    parser = ArgumentParser(prog="python -m launcher.bench.mone_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape only")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(report(UsageError("this benchmark needs a CUDA GPU (the kernels' CPU interpreter mode is "
                                           "for tests only)")))
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    shapes = SHAPES[1:2] if args.quick else SHAPES
    for D, F in shapes:
        bench_training(D, F, E=16, T=1024, keep=args.keep_ratio)  # 16 experts, 16384 rows (the issue-14 shape)
    for D, F in shapes:
        for T in (1, 4):
            bench_decode(D, F, E=16, T=T, keep=args.keep_ratio)


if __name__ == "__main__":
    main()
