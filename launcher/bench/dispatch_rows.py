"""Rows the EP all-to-all dispatches per token, with and without group-limited routing (issue 24).

    python -m launcher.bench.dispatch_rows                 # EP=4 gloo world: 16 experts, top-4, 1024 tokens per rank
    python -m launcher.bench.dispatch_rows --ep 4 --experts 32 --top-k 8 --tokens 2048 --json rows.json

Spawns its own gloo world (one process per EP rank, no torchrun needed). Every rank routes its own random tokens
with a randomly initialised DeepSeek-V3 router (sigmoid scores, a small random expert bias, ``routed_scaling_factor``
2.5; router weights of std 0.3, so a token's logits spread with std ~1.7 and its choices vary) under
each routing setting: no groups, and ``num_groups = ep`` groups (one per EP rank, DeepSeek-V3's node-limited
routing) of which a token may use its best ``group_topk`` (2, then 1). One forward + backward of the MoE layer
through ``AllToAllDispatcher`` (``parallel.dispatch``), which records what it sent (``DispatchCounts``). Per
setting, summed over the ranks, per token: the kept routing slots, i.e. the rows a dispatch without deduplication
sends (``T*K``: nothing is dropped here), the rows the deduplicated dispatch sent (one per (token, EP rank) pair),
and the most EP ranks one token reached.
"""
from __future__ import annotations

import json

import torch

from launcher.bench.world import run_gloo_world
from launcher.errors import ArgumentParser
from moe_core.config import MoEConfig
from moe_core.layer import MoELayer
from moe_core.matryoshka import KSchedule

__all__ = ["bench_rank", "format_table", "main", "parse_args"]


def settings(ep: int) -> list[tuple[int, int]]:
    """``(num_groups, group_topk)`` per row of the table: no groups, then one group per EP rank, best 2 and 1."""
    return [(1, 1), (ep, 2), (ep, 1)]


def bench_rank(rank: int, world: int, args) -> list[dict]:
    """This rank's counts per setting (run on every rank of a ``world = ep`` gloo world)."""
    from parallel.dispatch import shard_moe_layer
    from parallel.groups import initialize

    groups = initialize(1, 1, world)
    out = []
    for num_groups, group_topk in settings(world):
        cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_ffn_hidden_size=args.ffn,
                        score_function="sigmoid", expert_bias=True, routed_scaling_factor=2.5, num_groups=num_groups,
                        group_topk=group_topk)
        cfg.validate_groups()
        torch.manual_seed(args.seed)  # the same layer on every rank
        layer = shard_moe_layer(MoELayer(args.hidden, cfg, 0, KSchedule(cfg, args.seed)), groups).train()
        layer.router.reset_parameters(std=0.3)  # router logits of std ~1.7 at hidden 32: varied choices per token
        layer.router.expert_bias.copy_(torch.randn(args.experts, generator=torch.Generator().manual_seed(1)) * 0.01)
        x_TD = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(args.seed + rank))
        layer(x_TD).square().sum().backward()
        idx_TK = layer.router(x_TD, args.top_k).topk_idx_TK
        ranks_per_token = (idx_TK // (args.experts // world)).sort(1).values.diff(1).ne(0).sum(1) + 1
        counts = layer.dispatcher.last_counts
        out.append(dict(num_groups=num_groups, group_topk=group_topk, tokens=counts.tokens, slots=counts.slots,
                        rows=counts.rows, max_ranks=int(ranks_per_token.max())))
    return out


def summarise(per_rank: list[list[dict]]) -> list[dict]:
    """Per setting: the counts summed over the ranks, per token."""
    rows = []
    for parts in zip(*per_rank):
        tokens = sum(p["tokens"] for p in parts)
        rows.append(dict(num_groups=parts[0]["num_groups"], group_topk=parts[0]["group_topk"], tokens=tokens,
                         slots_per_token=sum(p["slots"] for p in parts) / tokens,
                         rows_per_token=sum(p["rows"] for p in parts) / tokens,
                         max_ranks_per_token=max(p["max_ranks"] for p in parts)))
    return rows


def format_table(rows: list[dict], args) -> str:
    lines = [f"EP={args.ep}, {args.experts} experts ({args.experts // args.ep} per rank), top-{args.top_k}, "
             f"{args.tokens} tokens per rank",
             "| routing | rows/token before dedup (= slots, T*K) | rows/token after dedup | saved | max EP ranks "
             "per token |", "|---|---|---|---|---|"]
    for r in rows:
        name = "no groups" if r["num_groups"] == 1 else f"{r['num_groups']} groups, group_topk={r['group_topk']}"
        saved = 1 - r["rows_per_token"] / r["slots_per_token"]
        lines.append(f"| {name} | {r['slots_per_token']:.3f} | {r['rows_per_token']:.3f} | {saved:.1%} | "
                     f"{r['max_ranks_per_token']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=int, default=4, help="EP ranks (processes) (default 4)")
    p.add_argument("--experts", type=int, default=16, help="routed experts, a multiple of --ep (default 16)")
    p.add_argument("--top-k", type=int, default=4, help="experts per token (default 4)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank (default 1024)")
    p.add_argument("--hidden", type=int, default=32, help="hidden size (default 32)")
    p.add_argument("--ffn", type=int, default=16, help="expert FFN width (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the layer and the tokens (default 0)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.ep < 1 or args.experts % args.ep or not 1 <= args.top_k <= args.experts // args.ep:
        p.error(f"--experts ({args.experts}) must be a multiple of --ep ({args.ep}) and --top-k ({args.top_k}) in "
                f"[1, experts per rank] (group_topk=1 must hold a token's k experts)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = summarise(run_gloo_world(bench_rank, args.ep, args))
    print(format_table(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
