"""Tensors between a moetron model (tp=pp=ep=1) and a Hugging Face directory, one tensor at a time, through a
family's names (launcher/hf/family.py) and the streaming safetensors reader/writer (launcher/hf/safetensors_io.py).

from-hf: :func:`check_hf_tensors` compares the directory's validated headers with the model's expected names and
shapes (a meta-device model: nothing allocated) BEFORE any tensor is read; :func:`load_hf` then copies one HF
tensor at a time into the model (an expert's [F, D] straight into its row of the [E, F, D] stack), and checks that
the family's copies of a tensor (DeepSeek-V3's MTP embedding and head) are bit-equal to it.
to-hf: :func:`export_plan` lists every HF tensor with its shape and dtype and a function producing it, from a model
in memory (:class:`ModelTensors`) or read from the checkpoint in bounded batches (:class:`CheckpointTensors`), converted
to the export dtype only when written.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from launcher.config import Config
from launcher.hf.family import Family
from launcher.hf.safetensors_io import FLOAT_DTYPES, HFDirError, HFWeights, PlannedTensor
from launcher.train import checkpoint

TIED_HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


@dataclass(frozen=True)
class Target:
    """One moetron tensor and its HF key(s): one key, or one per expert (``stacked``: key e is row e); ``copies``:
    further HF keys holding the same values as the (non-stacked) key."""

    name: str
    keys: list[str]
    shape: tuple[int, ...]
    stacked: bool
    copies: tuple[str, ...] = ()

    @property
    def key_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape


def targets(family: Family, cfg: Config, state: Mapping[str, torch.Tensor]) -> list[Target]:
    """The family's HF counterparts of ``state`` (a full moetron state dict, real or on the meta device)."""
    out = []
    for name, tensor in state.items():
        if family.writes(name, cfg):
            stacked = name.rpartition(".")[2] in family.expert_names
            out.append(Target(name, family.hf_keys(name, cfg), tuple(tensor.shape), stacked, family.copies(name, cfg)))
    return out


def check_counts(cfg: Config, weights: HFWeights) -> None:
    """config.json's layer and expert counts against the tensors the directory holds (``model.layers.{i}.`` and
    ``.experts.{e}.`` keys), before a model of that many layers/experts is even built on the meta device."""
    layers = {m[1] for k in weights.info if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    experts = {m[1] for k in weights.info if (m := re.search(r"\.experts\.(\d+)\.", k))}
    if cfg.model.num_layers > len(layers):
        raise HFDirError(f"config.json says {cfg.model.num_layers} layers but the weights in '{weights.hf_dir}' hold "
                         f"{len(layers)}; config.json does not describe these weights")
    if cfg.model.moe_layer_indices and cfg.moe.num_experts > len(experts):
        raise HFDirError(f"config.json says {cfg.moe.num_experts} experts but the weights in '{weights.hf_dir}' "
                         f"hold {len(experts)} per layer at most; config.json does not describe these weights")


def check_hf_tensors(family: Family, hf: Mapping, plan: list[Target], weights: HFWeights) -> dict[str, str]:
    """Validate the directory against ``plan`` before reading: every expected tensor and copy present (a tied
    ``lm_head`` reads the embedding), a float dtype, the expected shape; nothing left over but the family's
    ``ignored`` keys. Returns {HF key: key to read it from}."""
    source = {key: key for t in plan for key in (*t.keys, *t.copies)}
    if hf.get("tie_word_embeddings") and TIED_HEAD in source and TIED_HEAD not in weights.info:
        source[TIED_HEAD] = EMBED  # tied embeddings: lm_head is a copy (the logits are unchanged)
    for t in plan:
        for key in (*t.keys, *t.copies):
            info = weights.info.get(source[key])
            if info is None:
                raise HFDirError(f"tensor '{source[key]}' is missing from '{weights.hf_dir}' ({family.model_type} "
                                 "with this config.json needs it)")
            if info.dtype not in FLOAT_DTYPES:
                raise HFDirError(f"tensor '{source[key]}' is stored as {info.dtype}; from-hf converts float16/"
                                 "bfloat16/float32 weights: dequantize the checkpoint first")
            if info.shape != t.key_shape:
                raise HFDirError(f"tensor '{source[key]}' has shape {list(info.shape)} but config.json implies "
                                 f"{list(t.key_shape)} (config.json and weights disagree)")
    ignored = family.ignored(hf)
    unused = sorted(k for k in set(weights.info) - set(source.values()) if not (ignored and k.startswith(ignored)))
    if unused:
        raise HFDirError(f"{len(unused)} HF tensors have no moetron counterpart, e.g. {unused[:3]}; this is not a "
                         f"plain {family.model_type} checkpoint moetron can represent")
    return source


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def load_hf(model: torch.nn.Module, plan: list[Target], source: dict, weights: HFWeights) -> None:
    """Copy the HF tensors into ``model`` (whose state has ``plan``'s names), one tensor in memory at a time (two
    while a copy is compared: HFDirError unless it has the same dtype and bits as the tensor it copies)."""
    from launcher.progress import progress

    state = model.state_dict()
    with torch.no_grad(), progress(len(plan), "read weights", unit="tensor") as bar:
        for t in plan:
            target = state[t.name]
            for e, key in enumerate(t.keys):
                value = weights.read(source[key])
                (target[e] if t.stacked else target).copy_(value)
            for copy_key in t.copies:
                if not _same_bits(weights.read(copy_key), value):
                    raise HFDirError(f"tensor '{copy_key}' differs from '{source[t.keys[0]]}' (dtype or bits); "
                                     "moetron keeps one tensor for both (its MTP modules share the main model's "
                                     "embedding and head), so it cannot represent this checkpoint")
            bar.update(1)


Fetch = Callable[[str, Optional[int]], torch.Tensor]
"""(moetron name, expert row or None) -> that tensor; called in plan order, once per HF tensor (copies included)."""


class ModelTensors:
    """The tensors of a model in memory: ``state`` (names, shapes) and :meth:`fetcher`."""

    def __init__(self, model: torch.nn.Module):
        self.state = model.state_dict()

    def fetcher(self, plan: list[Target]) -> Fetch:
        return lambda name, row: self.state[name] if row is None else self.state[name][row]


class CheckpointTensors:
    """The tensors of a moetron checkpoint, without loading the model: ``state`` comes from a meta-device model of
    its config; the fetcher reads the plan's tensors in order, in batches of about ``batch_bytes`` (at least one
    tensor; an expert stack one expert row at a time), so memory holds one batch, not the model. A batch is
    ``min_batch_bytes`` or the plan's largest HF tensor, whichever is larger. A tensor's copies come from the same
    read (they add nothing to a batch)."""

    def __init__(self, ckpt_dir: Path, meta_model: torch.nn.Module, min_batch_bytes: int):
        self.ckpt_dir, self.batch_bytes = ckpt_dir, min_batch_bytes
        self.state, self.buffers = meta_model.state_dict(), checkpoint.persistent_buffer_names(meta_model)
        self.pending: list[tuple[Target, Optional[int]]] = []
        self.cache: dict = {}
        self.uses: dict = {}  # (name, row) -> fetches left of the cached tensor
        self.next = 0

    def fetcher(self, plan: list[Target]) -> Fetch:
        self.pending = [(t, e if t.stacked else None) for t in plan for e in range(len(t.keys) + len(t.copies))]
        self.batch_bytes = max([self.batch_bytes] + [math.prod(t.key_shape) * 4 for t in plan])
        return self.fetch

    def _read_batch(self) -> None:
        wanted, size, self.uses = {}, 0, {}
        while self.next < len(self.pending):
            t, row = self.pending[self.next]
            nbytes = math.prod(t.key_shape) * 4 if (t.name, row) not in wanted else 0
            if wanted and size + nbytes > self.batch_bytes:
                break
            prefix = "buffer." if t.name in self.buffers else "model."
            wanted[(t.name, row)] = (prefix + t.name, row, t.shape)
            self.uses[(t.name, row)] = self.uses.get((t.name, row), 0) + 1
            size += nbytes
            self.next += 1
        loaded = checkpoint.load_slices(self.ckpt_dir, wanted)
        self.cache = {(name, row): loaded[(name, row)] if row is None else loaded[(name, row)][0]
                      for name, row in wanted}

    def fetch(self, name: str, row: Optional[int]) -> torch.Tensor:
        if (name, row) not in self.cache:
            self._read_batch()
        self.uses[(name, row)] -= 1
        return self.cache[(name, row)] if self.uses[(name, row)] else self.cache.pop((name, row))


def export_plan(family: Family, plan: list[Target], fetch: Fetch, dtype: torch.dtype) -> list[PlannedTensor]:
    """Every HF tensor of ``plan`` (copies included) in ``dtype`` (fp32 for the family's fp32 keys), produced by
    ``fetch``."""
    items = []
    for t in plan:
        for e, key in enumerate((*t.keys, *t.copies)):
            key_dtype = torch.float32 if key.endswith(family.fp32_keys) else dtype
            row = e if t.stacked else None
            items.append(PlannedTensor(key, t.key_shape, key_dtype, lambda name=t.name, row=row: fetch(name, row)))
    return items
