"""Synthetic MoE routing with controlled skew, shared by the LLEP benchmark and its simulation.

  uniform   experts drawn uniformly
  zipf      expert e drawn with probability proportional to 1 / (e + 1) ** zipf_s
  hotP      P% of the tokens pick expert 0 as one of their K experts; the rest is uniform over other experts
            (hot100: every token has expert 0 among its K, the most skew distinct top-k choices allow)
"""
from __future__ import annotations

import torch

SCENARIOS = ("uniform", "zipf", "hot50", "hot80", "hot95")


def routing(scenario: str, tokens: int, experts: int, k: int, zipf_s: float, gen: torch.Generator) -> torch.Tensor:
    """``topk_idx_TK`` (int64, distinct experts per token) for one rank's tokens."""
    if scenario == "uniform":
        probs_E = torch.ones(experts)
    elif scenario == "zipf":
        probs_E = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** zipf_s
    elif scenario.startswith("hot") and scenario[3:].isdigit() and int(scenario[3:]) <= 100:
        hot_T = torch.rand(tokens, generator=gen) < int(scenario[3:]) / 100
        rest_TK = torch.multinomial(torch.ones(tokens, experts - 1), k, generator=gen) + 1  # never expert 0
        rest_TK[:, 0] = torch.where(hot_T, torch.zeros_like(rest_TK[:, 0]), rest_TK[:, 0])
        return rest_TK
    else:
        raise ValueError(f"unknown routing scenario '{scenario}' (choose from {', '.join(SCENARIOS)} or hotP, "
                         f"P in 0..100)")
    return torch.multinomial(probs_E.expand(tokens, experts).float(), k, generator=gen)
