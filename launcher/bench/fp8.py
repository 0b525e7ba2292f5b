"""Train the same MoE transformer in bf16 and in FP8 for N steps; print both loss curves and the step-time ratio.

    python -m launcher.bench.fp8 [--steps 60] [--backend torch|te] [--recipe delayed|current] [--keep-first-last]

Needs a CUDA GPU with FP8 (compute capability >= 8.9). Both runs start from the same weights and see the same
batches (a learnable synthetic task: each sequence is an arithmetic progression mod V with its own start and
stride, so the loss falls well below log V). Step time is the median of the steps after ``--warmup``, measured
with CUDA synchronisation. Results for the record go to docs/benchmarks.md ("FP8").
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from launcher.config import Config
from moe_core.transformer import MoETransformer
from parallel.fp8 import fp8_unavailable_here, convert_to_fp8, fp8_context, fp8_stats


def bench_config(args) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers, m.seq_length = args.vocab, args.hidden, args.layers, args.seq
    m.num_attention_heads, m.num_query_groups = args.hidden // 128, max(1, args.hidden // 512)
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_ffn_hidden_size = args.experts, 2, args.ffn
    cfg.train.micro_batch_size = args.batch
    cfg.fp8.backend, cfg.fp8.recipe, cfg.fp8.keep_first_last_bf16 = args.backend, args.recipe, args.keep_first_last
    return cfg


def batches(cfg: Config, steps: int, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    B, S, V = cfg.train.micro_batch_size, cfg.model.seq_length + 1, cfg.model.vocab_size
    out = []
    for _ in range(steps):
        start, stride = torch.randint(0, V, (B, 1), generator=g), torch.randint(1, 64, (B, 1), generator=g)
        out.append(((start + stride * torch.arange(S)) % V).to(device))
    return out


def train(model, cfg: Config, data: list[torch.Tensor], lr: float) -> tuple[list[float], list[float]]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses, times = [], []
    for step, tokens in enumerate(data):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.set_step(step)
        with fp8_context(cfg):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, times


def gemm_microbench(cfg: Config, tokens: int, dim: int, iters: int = 20) -> tuple[float, float]:
    """Median fwd+bwd time of one [tokens, dim] x [dim, dim] projection: nn.Linear bf16 vs its FP8 twin."""
    from parallel.fp8_torch import Fp8Linear, fp8_active

    lin = torch.nn.Linear(dim, dim, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    result = []
    for module, ctx in ((lin, torch.enable_grad), (Fp8Linear(lin, cfg.fp8), fp8_active)):
        times = []
        for _ in range(iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with ctx():
                module(x).sum().backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        result.append(statistics.median(times[3:]))
    return result[0], result[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--backend", choices=["te", "torch"], default="torch")
    p.add_argument("--recipe", choices=["delayed", "current", "mxfp8"], default="delayed")
    p.add_argument("--keep-first-last", action="store_true", help="keep the first and last layers in bf16")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of the FP8 projection")
    args = p.parse_args(argv)
    cfg = bench_config(args)
    reason = fp8_unavailable_here(cfg.fp8)
    if reason is not None:
        print(f"bench fp8: {reason}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.manual_seed(cfg.train.seed)
    ref = MoETransformer(cfg.model, cfg.moe, cfg.train.seed).to(device=device, dtype=torch.bfloat16)
    data = batches(cfg, args.steps, device)

    runs = {}
    for precision in ("bf16", "fp8"):
        cfg.train.precision = precision
        model = copy.deepcopy(ref)
        for i, block in model.layers.items():
            convert_to_fp8(block, cfg, int(i))
        runs[precision] = train(model, cfg, data, args.lr)
        if precision == "fp8":
            stats = fp8_stats(model)

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  backend={args.backend} "
          f"recipe={args.recipe} keep_first_last_bf16={args.keep_first_last}")
    print(f"model: layers={args.layers} hidden={args.hidden} experts={args.experts} top2 ffn={args.ffn} "
          f"vocab={args.vocab}; batch {args.batch}x{args.seq} tokens")
    print(f"{'step':>5} {'loss bf16':>10} {'loss fp8':>10} {'diff':>8}")
    for step, (a, b) in enumerate(zip(runs["bf16"][0], runs["fp8"][0])):
        if step % max(1, args.steps // 20) == 0 or step == args.steps - 1:
            print(f"{step:>5} {a:>10.4f} {b:>10.4f} {b - a:>+8.4f}")
    t_bf16, t_fp8 = (statistics.median(runs[k][1][args.warmup:]) for k in ("bf16", "fp8"))
    tokens = args.batch * args.seq
    print(f"median step time: bf16 {t_bf16 * 1e3:.1f} ms ({tokens / t_bf16:,.0f} tok/s), "
          f"fp8 {t_fp8 * 1e3:.1f} ms ({tokens / t_fp8:,.0f} tok/s); fp8/bf16 step-time ratio {t_fp8 / t_bf16:.3f}")
    if args.backend == "torch":
        t_lin, t_lin8 = gemm_microbench(cfg, args.batch * args.seq, args.hidden)
        print(f"one {args.batch * args.seq}x{args.hidden}x{args.hidden} projection fwd+bwd: bf16 {t_lin * 1e3:.2f} ms, "
              f"fp8 {t_lin8 * 1e3:.2f} ms, ratio {t_lin8 / t_lin:.3f}")
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                gemm_microbench(cfg, args.batch * args.seq, args.hidden, iters=5)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    for key in sorted(stats)[:6]:
        print(f"  {key} = {stats[key]:.4g}")


if __name__ == "__main__":
    main()
