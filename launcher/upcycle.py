"""Dense-to-MoE upcycling of moetron state dicts (Komatsuzaki et al., arXiv 2212.05055; He et al., arXiv 2410.07524),
plain and granular, into plain top-k MoE, MoNE or Matryoshka MoE. Pure functions: one-process tensors in, tensors
out (the ``moetron convert upcycle`` command reads the dense model and writes the checkpoint).

Each dense SwiGLU MLP ``y = W_d (silu(W_g x) * W_u x)`` with F_d neurons becomes E routed experts of
F = F_d / G neurons (G = ``granularity``): expert ``j = r * G + c`` (replica r of E / G, slice c of G) holds the
dense neurons ``[c F, (c + 1) F)`` -- gate/up rows and down columns -- so the G slices of one replica add up to the
dense MLP exactly (the down projection sums over neurons). The router rows of one replica's G slices are equal, so a
token that picks a replica picks its G slices together (k a multiple of G). What equals the dense output at step 0,
with ``gate_sum`` the sum of a token's k gate weights:

* renormalised gates (``moe.norm_topk_prob`` true; ``MoEConfig.renormalise_gates``): ``gate_sum = 1`` for ANY
  router, so the router is random (normal, std ``model.init_std``; one row per replica) and the routed output is
  ``(1 / G) dense``: every down projection is multiplied by G. Equal at EVERY k that is a multiple of G
  (Matryoshka included), whatever experts are chosen. This is the construction of megatron-core's granular
  upcycling, except that the whole scale goes on the (linear) down projection: megatron-core spreads it as a cube
  root over gate, up and down, which is not exact through silu.
* raw gates (``norm_topk_prob`` false: the Matryoshka default; a top-1 model with ``moe.top1_gate: probability``):
  the top-k probabilities sum to a token-dependent value unless the router is uniform, so the router weight is
  ZERO (every probability 1/E, ``gate_sum = k / E``) and the down projections are multiplied by ``E / k_ref``,
  ``k_ref`` = the model's evaluation k (``top_k``, or Matryoshka's ``eval_k`` / ``k_max``). Equal at ``k = k_ref``;
  at another k the routed output is ``(k / k_ref) dense``. A zero router ties every expert, so which experts a token
  reaches is the top-k tie-break: the same output at G = 1 (every expert is the same copy), not at G > 1 (a slice
  could be missed), so raw gates need ``granularity`` 1. The router still learns (the gates' gradient, the aux
  and z losses).
* MoNE (``mone_keep_ratio`` rho): each routed expert keeps, per token, its ``max(1, round(rho F))`` neurons with
  the largest ``|silu(W_g x)|`` (moe_core/mone.py). The scale sits on the down projection, so selection is
  unchanged by it, and at step 0 the upcycled model equals the dense model whose MLP keeps, per token, the top
  ``round(rho F)`` neurons by ``|silu(W_g x)|`` inside each of its G slices of F neurons (the whole MLP at G = 1),
  zeroing the others; at rho = 1, the dense model.
* shared expert (``shared_expert``): a copy of the dense MLP (width F_d) whose down projection is halved, and the
  routed experts carry the other half (their scale halved): output ``= dense / 2 + dense / 2``. Not MoNE-selected
  (``moe.mone.shared_experts`` false).

Capacity dropping would break the equality, so the result is dropless (``moe.capacity_factor`` null); the router
uses softmax scores, no groups, no expert bias, ``routed_scaling_factor`` 1.
"""
from __future__ import annotations

import copy
from typing import Mapping, Optional, Sequence

import torch

from launcher.config import Config, validate
from launcher.config_parse import ConfigError
from launcher.errors import MoetronError

MLP_KEYS = ("gate_proj", "up_proj", "down_proj")


class UpcycleError(MoetronError):
    """The upcycling cannot be done as asked; the message says why and what to do."""

    kind = "upcycle"


def upcycle_config(dense_cfg: Config, experts: int, top_k: int, granularity: int = 1,
                   norm_topk_prob: Optional[bool] = None, mone_keep_ratio: Optional[float] = None,
                   matryoshka: Optional[tuple[int, int]] = None, shared_expert: bool = False,
                   keep_dense: Sequence[int] = ()) -> Config:
    """The MoE config upcycled from ``dense_cfg`` (a copy; :func:`upcycle_state_dict` documents the arguments).
    Raises :class:`UpcycleError` naming what does not fit."""
    m = dense_cfg.model
    if sorted(set(m.dense_layers)) != list(range(m.num_layers)):
        raise UpcycleError(f"the model to upcycle must be dense (model.dense_layers = every layer), but layers "
                           f"{m.moe_layer_indices} are MoE layers")
    if m.mtp_num_layers:
        raise UpcycleError(f"model.mtp_num_layers is {m.mtp_num_layers}: the multi-token prediction modules hold MoE "
                           "blocks a dense model does not have; upcycle with model.mtp_num_layers=0")
    if granularity < 1 or m.dense_ffn_hidden_size % granularity:
        raise UpcycleError(f"granularity {granularity} must be >= 1 and divide the dense MLP width "
                           f"{m.dense_ffn_hidden_size} (model.dense_ffn_hidden_size)")
    if experts % granularity or top_k % granularity:
        raise UpcycleError(f"experts ({experts}) and top-k ({top_k}) must be multiples of the granularity "
                           f"({granularity}): a token must reach all {granularity} slices of the replicas it picks")
    bad = [i for i in keep_dense if not 0 <= i < m.num_layers]
    if bad:
        raise UpcycleError(f"layers {bad} to keep dense are outside [0, {m.num_layers})")
    cfg = copy.deepcopy(dense_cfg)
    cfg.model.dense_layers = sorted(set(keep_dense))
    moe = cfg.moe
    moe.num_experts, moe.top_k, moe.expert_ffn_hidden_size = experts, top_k, m.dense_ffn_hidden_size // granularity
    moe.norm_topk_prob, moe.capacity_factor = norm_topk_prob, None
    moe.score_function, moe.routed_scaling_factor, moe.num_groups, moe.group_topk = "softmax", 1.0, 1, 1
    moe.expert_bias = False
    moe.shared_expert_ffn_hidden_size = m.dense_ffn_hidden_size if shared_expert else 0
    moe.shared_expert_gate = False
    moe.mone.enabled, moe.mone.shared_experts = mone_keep_ratio is not None, False
    if mone_keep_ratio is not None:
        moe.mone.keep_ratio = mone_keep_ratio
    moe.matryoshka.enabled = matryoshka is not None
    if matryoshka is not None:
        moe.matryoshka.k_min, moe.matryoshka.k_max = matryoshka
    try:
        validate(cfg)
    except ConfigError as e:
        raise UpcycleError(f"the upcycled config does not fit: {e}") from None
    if not moe.renormalise_gates and granularity > 1:
        raise UpcycleError("granular upcycling needs renormalised gates (norm_topk_prob true): with raw gates the "
                           "router must start uniform and a token could miss a slice of the dense MLP; pass "
                           "norm_topk_prob true or granularity 1")
    return cfg


def routed_scale(cfg: Config, granularity: int, shared_expert: bool) -> float:
    """The factor on every routed expert's down projection that makes the routed output the dense MLP's (half of
    it with a shared expert): ``G`` with renormalised gates, ``E / k_ref`` with raw ones (module docstring)."""
    moe = cfg.moe
    if moe.renormalise_gates:
        scale = float(granularity)
    else:
        k_ref = moe.default_eval_k
        if isinstance(k_ref, list):
            raise UpcycleError("raw gates with a per-layer moe.matryoshka.eval_k: pass one eval k (the k at which the "
                               "upcycled model equals the dense one)")
        scale = moe.num_experts / k_ref
    return scale / 2 if shared_expert else scale


def _experts(w_gate_FD: torch.Tensor, w_up_FD: torch.Tensor, w_down_DF: torch.Tensor, experts: int,
             granularity: int, scale: float) -> dict[str, torch.Tensor]:
    """Stacked expert weights: expert ``r * G + c`` = neuron slice c of the dense MLP, down projection times
    ``scale``."""
    slices_gate = w_gate_FD.chunk(granularity, dim=0)
    slices_up = w_up_FD.chunk(granularity, dim=0)
    slices_down = (w_down_DF * scale).chunk(granularity, dim=1)
    replicas = experts // granularity
    return {"w_gate_EFD": torch.stack(slices_gate * replicas), "w_up_EFD": torch.stack(slices_up * replicas),
            "w_down_EDF": torch.stack(slices_down * replicas)}


def _router(cfg: Config, granularity: int, gen: torch.Generator) -> torch.Tensor:
    """[E, D] fp32: random rows (one per replica, repeated for its G slices) with renormalised gates, else zero."""
    moe, d = cfg.moe, cfg.model.hidden_size
    if not moe.renormalise_gates:
        return torch.zeros(moe.num_experts, d)
    rows = torch.randn(moe.num_experts // granularity, d, generator=gen) * cfg.model.init_std
    return rows.repeat_interleave(granularity, dim=0)


def upcycle_state_dict(dense_cfg: Config, dense_sd: Mapping[str, torch.Tensor], experts: int, top_k: int,
                       granularity: int = 1, *, norm_topk_prob: Optional[bool] = None,
                       mone_keep_ratio: Optional[float] = None, matryoshka: Optional[tuple[int, int]] = None,
                       shared_expert: bool = False, keep_dense: Sequence[int] = (),
                       seed: Optional[int] = None) -> tuple[Config, dict[str, torch.Tensor]]:
    """Upcycle a dense moetron model into an MoE whose output equals the dense model's at step 0 (module docstring).

    ``dense_cfg``: the dense model's config (``model.dense_layers`` = every layer); ``dense_sd``: its single-device
    state dict (``MoETransformer.state_dict()`` names, any float dtype). ``experts`` E and ``top_k`` k: routed
    experts and experts per token (multiples of ``granularity`` G; with Matryoshka, k is ``moe.top_k`` and
    ``matryoshka = (k_min, k_max)`` the training range); ``granularity``: G neuron slices per dense MLP (expert width
    ``dense_ffn_hidden_size / G``); ``norm_topk_prob``: ``moe.norm_topk_prob`` (None = moetron's default: true,
    false under Matryoshka); ``mone_keep_ratio``: enable MoNE with that keep ratio; ``shared_expert``: add the dense
    MLP as a shared expert (half the output each); ``keep_dense``: layers that stay dense; ``seed``: the router's
    random rows (default ``train.seed``).

    Returns ``(moe_cfg, moe_sd)``: the MoE config (a copy of ``dense_cfg``) and a state dict with every key of
    ``MoETransformer(moe_cfg.model, moe_cfg.moe, ...).state_dict()`` (router ``expert_bias`` zeros), expert
    weights in the dense dtype, routers fp32. Non-MLP tensors are the dense ones (shared, not copied).
    Raises :class:`UpcycleError` (one line) when the arguments do not fit the model.
    """
    cfg = upcycle_config(dense_cfg, experts, top_k, granularity, norm_topk_prob, mone_keep_ratio, matryoshka,
                         shared_expert, keep_dense)
    scale = routed_scale(cfg, granularity, shared_expert)
    gen = torch.Generator().manual_seed(cfg.train.seed if seed is None else seed)
    out = {k: v for k, v in dense_sd.items() if not _is_upcycled_mlp(k, cfg)}
    for i in cfg.model.moe_layer_indices:
        prefix = f"layers.{i}.mlp."
        try:
            gate, up, down = (dense_sd[f"{prefix}{name}.weight"] for name in MLP_KEYS)
        except KeyError as e:
            raise UpcycleError(f"the dense state dict has no {e.args[0]}: pass a dense moetron state dict") from None
        for name, t in _experts(gate, up, down, experts, granularity, scale).items():
            out[f"{prefix}experts.{name}"] = t
        out[f"{prefix}router.weight"] = _router(cfg, granularity, gen)
        out[f"{prefix}router.expert_bias"] = torch.zeros(experts)
        if shared_expert:
            out[f"{prefix}shared_expert.gate_proj.weight"] = gate
            out[f"{prefix}shared_expert.up_proj.weight"] = up
            out[f"{prefix}shared_expert.down_proj.weight"] = down / 2
    return cfg, out


def _is_upcycled_mlp(key: str, cfg: Config) -> bool:
    parts = key.split(".")
    return (len(parts) > 3 and parts[0] == "layers" and parts[2] == "mlp"
            and int(parts[1]) in cfg.model.moe_layer_indices)
