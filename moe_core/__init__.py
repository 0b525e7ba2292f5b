"""Single-device MoE math (no torch.distributed): router, experts, MoNE, Matryoshka k schedule, the token-dispatcher
protocol, MoE layer."""
from moe_core.aux_loss import AuxLossAutoScaler
from moe_core.experts import SwiGLUExperts, swiglu_reference
from moe_core.dispatcher import DispatchState, TokenDispatcher, dispatch_compute_combine
from moe_core.layer import LocalDispatcher, MoELayer, MoELayerStats
from moe_core.matryoshka import KSchedule
from moe_core.mone import mone_swiglu_torch
from moe_core.permute import DeviceRouting, Permutation, group_by_device, make_permutation, permute_tokens, \
    sort_by_expert, sum_tokens, unpermute_tokens
from moe_core.router import RouterOutput, TopKRouter

__all__ = ["AuxLossAutoScaler", "DeviceRouting", "DispatchState", "KSchedule", "LocalDispatcher", "MoELayer", "MoELayerStats",
           "Permutation", "RouterOutput", "SwiGLUExperts", "TokenDispatcher", "TopKRouter", "dispatch_compute_combine",
           "group_by_device", "make_permutation", "mone_swiglu_torch", "permute_tokens", "sort_by_expert",
           "sum_tokens", "swiglu_reference", "unpermute_tokens"]
