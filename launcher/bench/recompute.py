"""Activation recompute on CPU: the activation bytes each ``train.recompute`` option saves and the step time it costs,
side by side, measured in one run (one process, one model shape, the same batches).

    python -m launcher.bench.recompute                       # ~5M-parameter MoE (MoNE, shared expert, dense layer)
    python -m launcher.bench.recompute --layers 4 --seq 512 --steps 5

For each option the model is built from the same seed and runs ``--steps`` timed training forward+backward passes
(after one warm-up) on the same synthetic micro-batch; the step time is the median. Activation bytes are measured
on one more pass with :class:`LivePeak`: the largest total, after any op, of the tensors created since the forward
began that are still alive (parameters, buffers and gradient buffers excluded), which is the activation peak of a
micro-batch, the recomputed region included. Ratios are against ``none``; the dry-run estimate
(launcher/train/memory.py) of the same activations is printed next to the measured one.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from launcher.errors import ArgumentParser

MiB = 1 << 20
SELECTIVE = "core_attn,moe_act,shared_experts,norm,mlp"
OPTIONS = {"none": [], "selective": ["train.recompute=selective", f"train.recompute_modules=[{SELECTIVE}]"],
           "moe": ["train.recompute=selective", "train.recompute_modules=[moe]"], "full": ["train.recompute=full"]}


class LivePeak(TorchDispatchMode):
    """The most bytes, after any op while active, held by tensors its ops created that are still alive; storages
    whose ``data_ptr`` is in ``exclude`` (parameters, gradients) are not counted."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude, self.live, self.peak = exclude, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.exclude:
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {ptr: entry for ptr, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out

    @staticmethod
    def excluding(model: torch.nn.Module) -> "LivePeak":
        """A tracker that skips ``model``'s parameters, buffers and existing gradients (``.grad``, ``main_grad``)."""
        tensors = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters()),
                   *(getattr(p, "main_grad", None) for p in model.parameters())]  # megatron-core's grad buffer
        return LivePeak({t.untyped_storage().data_ptr() for t in tensors if t is not None})


def model_overrides(args: argparse.Namespace) -> list[str]:
    return [f"model.vocab_size={args.vocab}", f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
            "model.num_attention_heads=8", "model.num_query_groups=4", f"model.seq_length={args.seq}",
            "model.dense_layers=[0]", f"model.dense_ffn_hidden_size={4 * args.hidden}",
            f"moe.num_experts={args.experts}", f"moe.top_k={args.top_k}", f"moe.expert_ffn_hidden_size={args.ffn}",
            f"moe.shared_expert_ffn_hidden_size={args.ffn}", "moe.mone.enabled=true", "data.source=synthetic",
            f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}"]


def measure(option: str, overrides: list[str], steps: int) -> dict:
    """One option: median step time (s) of ``steps`` passes, measured and estimated activation bytes."""
    from launcher.config import load_config
    from launcher.train.memory import estimate
    from parallel.groups import ParallelGroups
    from parallel.model import build_model, token_losses

    cfg = load_config(None, [*overrides, *OPTIONS[option]])
    single = ParallelGroups.single()
    model = build_model(cfg, single)
    model.set_step(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_length + 1),
                           generator=torch.Generator().manual_seed(0))

    def step() -> None:
        token_losses(model(tokens[:, :-1]), tokens[:, 1:], single).mean().backward()

    step()  # warm-up; allocates the gradients the tracker excludes
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    tracker = LivePeak.excluding(model)
    with tracker:
        step()
    return {"option": option, "step_s": statistics.median(times), "activations": tracker.peak,
            "estimate": estimate(cfg, 1).activations}


def format_table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [f"{'option':10s} {'activations':>12s} {'vs none':>8s} {'saved':>7s} {'estimate':>10s} "
             f"{'step':>9s} {'vs none':>8s}"]
    for r in rows:
        ratio = r["activations"] / base["activations"]
        lines.append(f"{r['option']:10s} {r['activations'] / MiB:8.1f} MiB {ratio:8.2f} {1 - ratio:7.0%} "
                     f"{r['estimate'] / MiB:6.1f} MiB {1e3 * r['step_s']:6.0f} ms {r['step_s'] / base['step_s']:8.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m launcher.bench.recompute", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=256, help="routed (and shared) expert width")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed passes per option (median)")
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    options = ["none", *[o for o in args.options if o != "none"]]
    rows = [measure(option, model_overrides(args), args.steps) for option in options]
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
