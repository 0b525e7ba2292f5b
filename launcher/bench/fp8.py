"""bf16 vs FP8 side by side in one run: a dense projection, the grouped experts, and N training steps of the same MoE
transformer (loss curves and step-time ratio).

    python -m launcher.bench.fp8 [--steps 60] [--recipe tensorwise|rowwise] [--keep-first-last] [--compile]

GPU only: needs a CUDA GPU with FP8 (compute capability >= 8.9); elsewhere it prints one line and exits 2. The
FP8 side is the torchao backend (parallel/fp8/torchao_backend.py): torchao Float8Linear for the projection, the grouped
rowwise FP8 GEMM for the experts (parallel/fp8/grouped.py); the bf16 side is nn.Linear and moetron's grouped bf16
experts (one torch._grouped_mm per projection), the strongest baselines here. ``--compile`` wraps both sides'
projection and experts in torch.compile (torchao fuses its casts there). Both training runs start from the same
weights and see the same batches (each sequence an arithmetic progression mod V with its own start and stride, so
the loss falls well below log V). Times are medians after ``--warmup`` with CUDA synchronisation. Results for the
record go to docs/benchmarks.md ("FP8").
"""
from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from launcher.errors import ArgumentParser, UsageError, report
from launcher.config import Config
from moe_core.config import MoNEConfig
from moe_core.experts import SwiGLUExperts
from moe_core.transformer import MoETransformer
from parallel.fp8.swap import convert_to_fp8, fp8_context, fp8_unavailable_here


def bench_config(args) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers, m.seq_length = args.vocab, args.hidden, args.layers, args.seq
    m.num_attention_heads, m.num_query_groups = args.hidden // 128, max(1, args.hidden // 512)
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_ffn_hidden_size = args.experts, 2, args.ffn
    cfg.train.micro_batch_size = args.batch
    cfg.train.precision, cfg.fp8.recipe, cfg.fp8.keep_first_last_bf16 = "fp8", args.recipe, args.keep_first_last
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


def _median_ms(fn, iters: int, warmup: int = 3) -> float:
    times = []
    for _ in range(iters + warmup):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:]) * 1e3


def module_bench(cfg: Config, tokens: int, compile_: bool, iters: int = 20) -> list[tuple[str, float, float]]:
    """(name, bf16 ms, fp8 ms) of forward+backward: one [tokens, D] x [D, D] projection, and the grouped experts on
    ``tokens * top_k`` rows spread evenly over the experts."""
    from parallel.fp8.experts import Float8GroupedExperts
    from parallel.fp8.torchao_backend import convert_module

    D, F, E, k = cfg.model.hidden_size, cfg.moe.expert_ffn_hidden_size, cfg.moe.num_experts, cfg.moe.top_k
    lin = torch.nn.Linear(D, D, bias=False, device="cuda", dtype=torch.bfloat16)
    experts = SwiGLUExperts(E, D, F, MoNEConfig()).to(device="cuda", dtype=torch.bfloat16)
    rows = tokens * k
    counts_E = torch.full((E,), rows // E, device="cuda", dtype=torch.int64)
    pairs = {"projection": (lin, convert_module(copy.deepcopy(lin), cfg.fp8), (tokens, D), ()),
             "experts": (experts, Float8GroupedExperts(experts), (rows, D), (counts_E,))}
    out = []
    for name, (bf16, fp8, shape, extra) in pairs.items():
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        row = []
        for module in (bf16, fp8):
            fn = torch.compile(module) if compile_ else module
            row.append(_median_ms(lambda f=fn, x=x, a=extra: f(x, *a).float().square().mean().backward(), iters))
        out.append((name, *row))
    return out


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m launcher.bench.fp8", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--recipe", choices=["tensorwise", "rowwise"], default="tensorwise")
    p.add_argument("--compile", action="store_true", help="torch.compile the benchmarked projection and experts")
    p.add_argument("--keep-first-last", action="store_true", help="keep the first and last layers in bf16")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    args = p.parse_args(argv)
    cfg = bench_config(args)
    reason = fp8_unavailable_here(cfg)
    if reason is not None:
        return report(UsageError(reason))
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
    cfg.train.precision = "fp8"

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  backend=torchao "
          f"recipe={args.recipe} keep_first_last_bf16={args.keep_first_last} compile={args.compile}")
    tokens = args.batch * args.seq
    print(f"{'fwd+bwd':>12} {'bf16 ms':>9} {'fp8 ms':>9} {'fp8/bf16':>9}   ({tokens} tokens, D={args.hidden}, "
          f"F={args.ffn}, E={args.experts}, top-2)")
    for name, t_bf16, t_fp8 in module_bench(cfg, tokens, args.compile):
        print(f"{name:>12} {t_bf16:>9.3f} {t_fp8:>9.3f} {t_fp8 / t_bf16:>9.3f}")
    print(f"model: layers={args.layers} hidden={args.hidden} experts={args.experts} top2 ffn={args.ffn} "
          f"vocab={args.vocab}; batch {args.batch}x{args.seq} tokens")
    print(f"{'step':>5} {'loss bf16':>10} {'loss fp8':>10} {'diff':>8}")
    for step, (a, b) in enumerate(zip(runs["bf16"][0], runs["fp8"][0])):
        if step % max(1, args.steps // 20) == 0 or step == args.steps - 1:
            print(f"{step:>5} {a:>10.4f} {b:>10.4f} {b - a:>+8.4f}")
    t_bf16, t_fp8 = (statistics.median(runs[k][1][args.warmup:]) for k in ("bf16", "fp8"))
    print(f"median step time: bf16 {t_bf16 * 1e3:.1f} ms ({tokens / t_bf16:,.0f} tok/s), "
          f"fp8 {t_fp8 * 1e3:.1f} ms ({tokens / t_fp8:,.0f} tok/s); fp8/bf16 step-time ratio {t_fp8 / t_bf16:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
