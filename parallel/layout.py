"""Which layers each pipeline stage runs: ``parallel.pp`` ranks x ``parallel.virtual_pp`` model chunks.

Virtual stage ``v * pp + r`` (v < virtual_pp) is model chunk v of pipeline rank r, as in megatron-core's interleaved
schedule. Without ``parallel.pp_layout`` every virtual stage runs ``num_layers / (pp * virtual_pp)`` consecutive
layers, the first also the embedding, the last also the final norm, LM head and MTP modules. ``parallel.pp_layout``
places them explicitly in megatron-core's ``--pipeline-model-parallel-layout`` vocabulary: one string, stages
separated by ``|`` (or a list with one string per stage), ``E`` the embedding, ``t`` one transformer layer (dense
or MoE, in model order), ``m`` one MTP module, ``L`` the final norm + LM head (the loss); ``X*n`` and ``(...)*n``
repeat. E.g. ``"Et|tt|tmL"`` for 4 layers and one MTP module over 3 virtual stages, or ``"Et*3|(tt|)*2t*3mL"``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

_STAGE = re.compile(r"E?t*m*L?")


@dataclass(frozen=True)
class ChunkPlan:
    """One virtual pipeline stage: its layers (global indices) and whether it holds the embedding / the head."""

    layers: range
    pre_process: bool
    post_process: bool


def _expand(layout: str) -> str:
    """``X*n`` and ``(...)*n`` written out; ValueError on anything outside the vocabulary."""
    text = layout.replace(" ", "")
    while True:
        expanded = re.sub(r"\(([^()]*)\)\*(\d+)", lambda m: m[1] * int(m[2]), text)
        if expanded == text:
            break
        text = expanded
    text = re.sub(r"([EtmL|])\*(\d+)", lambda m: m[1] * int(m[2]), text)
    bad = set(text) - set("EtmL|")
    if bad:
        raise ValueError(f"parallel.pp_layout: unknown symbol(s) {''.join(sorted(bad))!r} in {layout!r}: use E "
                         "(embedding), t (layer), m (MTP module), L (head/loss), | (next stage), X*n, (...)*n")
    return text


def plan_stages(num_layers: int, mtp_num_layers: int, pp: int, virtual_pp: int,
                pp_layout: Union[str, list[str], None] = None) -> list[ChunkPlan]:
    """The ``pp * virtual_pp`` virtual stages in model order; ValueError naming the ``parallel.*`` key when the
    layout cannot hold the model."""
    stages = pp * virtual_pp
    if virtual_pp > 1 and pp == 1:
        raise ValueError("parallel.virtual_pp > 1 needs parallel.pp > 1 (interleaving splits a pipeline rank's "
                         "layers into chunks)")
    if pp_layout is None:
        if num_layers % stages:
            raise ValueError(f"parallel.pp * parallel.virtual_pp ({pp}*{virtual_pp}) must divide model.num_layers "
                             f"({num_layers}), or set parallel.pp_layout")
        per = num_layers // stages
        return [ChunkPlan(range(s * per, (s + 1) * per), s == 0, s == stages - 1) for s in range(stages)]
    parts = _expand("|".join(pp_layout) if isinstance(pp_layout, list) else pp_layout).split("|")
    if len(parts) != stages:
        raise ValueError(f"parallel.pp_layout has {len(parts)} stages, parallel.pp * parallel.virtual_pp = "
                         f"{pp}*{virtual_pp} = {stages}")
    for i, part in enumerate(parts):
        if not _STAGE.fullmatch(part):
            raise ValueError(f"parallel.pp_layout: stage {i} is {part!r}; a stage is E? t* m* L? in this order")
    if "E" not in parts[0] or "L" not in parts[-1] or "".join(parts).count("E") + "".join(parts).count("L") != 2:
        raise ValueError("parallel.pp_layout: E (embedding) must be in the first stage and L (head) in the last, "
                         "once each")
    if sum(p.count("t") for p in parts) != num_layers:
        raise ValueError(f"parallel.pp_layout places {sum(p.count('t') for p in parts)} layers (t), "
                         f"model.num_layers is {num_layers}")
    if parts[-1].count("m") != mtp_num_layers or any("m" in p for p in parts[:-1]):
        raise ValueError(f"parallel.pp_layout: the last stage must hold model.mtp_num_layers ({mtp_num_layers}) "
                         "MTP modules (m) with the head, and no other stage any")
    plans, start = [], 0
    for i, part in enumerate(parts):
        n = part.count("t")
        plans.append(ChunkPlan(range(start, start + n), i == 0, i == stages - 1))
        start += n
    return plans


def rank_chunks(plans: list[ChunkPlan], pp: int, pp_rank: int) -> list[ChunkPlan]:
    """The virtual stages pipeline rank ``pp_rank`` runs, in schedule (chunk) order."""
    return plans[pp_rank::pp]
