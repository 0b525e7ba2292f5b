"""A Hugging Face model family as data: which config.json keys carry which moetron setting, which HF options moetron
cannot represent, and how parameter names map. One small file per family (``launcher/hf/families/``) builds a
:class:`Family`; this module is the one engine that applies it both ways (config here, tensors in transfer.py).

Names: a moetron parameter ``name`` (tp=pp=ep=1), first rewritten by the family's ``layer_name`` (names whose HF
form needs the config: DeepSeek-V3's MTP module i is HF layer ``num_hidden_layers + i``), is HF key
``model.<name>`` (``lm_head.weight`` as is) rewritten by the family's ``renames`` (regex, replacement; applied in
order); stacked expert weights ``...experts.w_gate_EFD`` [E, F, D] become one HF key per expert,
``...experts.{e}.<expert_names[leaf]>.weight``. ``copies`` names extra HF keys that hold a copy of a moetron tensor
(DeepSeek-V3's MTP layers keep the embedding and the head): to-hf writes them, from-hf requires them bit-equal.

Config: ``fields`` (moetron path -> :class:`Key`) carry the same value both ways; ``soft`` ones (training-time
defaults) are taken from HF only when the recipe does not set them; ``sets`` are moetron values every model of the
family has; ``unsupported`` lists config.json keys with the only value moetron represents (another value is one line
naming every such key; to-hf writes them); ``read`` / ``write`` derive the rest (dense layers, RoPE, gates).
Every config.json value is type-checked (:func:`hf_value`): an int size must be a JSON integer in [0, 2^24].
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

from launcher.config import Config, ConfigError

NO_DEFAULT = object()
MAX_INT = 1 << 24
"""Largest integer a config.json size may hold (the largest real ones: vocab ~2^18, context ~2^20)."""
EXPERT_NAMES = {"w_gate_EFD": "gate_proj", "w_up_EFD": "up_proj", "w_down_EDF": "down_proj"}
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class Key:
    """A config.json entry: its name, JSON type, value when absent (``NO_DEFAULT``: required), whether null is a
    value (e.g. DeepSeek's ``q_lora_rank``), and another name it may be stored under (read only)."""

    name: str
    kind: type = int
    default: Any = NO_DEFAULT
    nullable: bool = False
    alias: str | None = None


def hf_value(hf: Mapping[str, Any], key: Key) -> Any:
    """``hf[key.name]`` (or ``hf[key.alias]``) checked against ``key`` (ConfigError naming the key otherwise)."""
    if key.name not in hf and key.alias in hf:
        key = dataclasses.replace(key, name=key.alias)
    if key.name not in hf:
        if key.default is NO_DEFAULT:
            raise ConfigError(f"HF config: '{key.name}' is missing from config.json")
        return key.default
    value = hf[key.name]
    if value is None and key.nullable:
        return None
    ok = {int: type(value) is int, bool: type(value) is bool, str: type(value) is str,
          float: type(value) in (int, float) and math.isfinite(value)}[key.kind]
    if not ok:
        null = " or null" if key.nullable else ""
        raise ConfigError(f"HF config: {key.name} is {value!r} ({type(value).__name__}); it must be "
                          f"{_KIND_NAMES[key.kind]}{null}")
    if key.kind is int and not 0 <= value <= MAX_INT:
        raise ConfigError(f"HF config: {key.name}={value} is outside [0, {MAX_INT}]; config.json is damaged or not "
                          "a model config")
    return float(value) if key.kind is float else value


def _nothing(_: Any) -> dict:
    return {}


def _no_problems(_: Config) -> list[str]:
    return []


def _written(name: str, cfg: Config) -> bool:
    return True


def _same_name(name: str, cfg: Config) -> str:
    return name


def _no_copies(name: str, cfg: Config) -> tuple[str, ...]:
    return ()


def _as_is(hf: Mapping[str, Any], keys: Collection[str]) -> tuple[Mapping[str, Any], str]:
    return hf, ""


@dataclass(frozen=True)
class Family:
    """One Hugging Face ``model_type`` (module docstring)."""

    model_type: str
    architecture: str
    fields: Mapping[str, Key]
    soft: Mapping[str, Key] = field(default_factory=dict)
    sets: Mapping[str, Any] = field(default_factory=dict)
    export_requires: Mapping[str, Any] = field(default_factory=dict)
    """moetron path -> the value to-hf needs (the family's HF model has no other)."""
    unsupported: Mapping[str, Any] = field(default_factory=dict)
    renames: tuple[tuple[str, str], ...] = ()
    expert_names: Mapping[str, str] = field(default_factory=lambda: dict(EXPERT_NAMES))
    fp32_keys: tuple[str, ...] = ()
    """HF key suffixes written in fp32 whatever ``--dtype`` (what moetron routes with in fp32)."""
    read: Callable[[Mapping[str, Any]], dict[str, Any]] = _nothing
    """config.json -> {moetron path: value} for the settings ``fields`` cannot express."""
    write: Callable[[Config], dict[str, Any]] = _nothing
    """moetron config -> {config.json key: value}, the other direction (may override model_type/architectures)."""
    check_export: Callable[[Config], list[str]] = _no_problems
    """What this family cannot write beyond ``export_requires`` (``name=value (why)`` items)."""
    writes: Callable[[str, Config], bool] = _written
    """Whether moetron tensor ``name`` has an HF counterpart in this model (e.g. an unused expert bias has none)."""
    custom_code: Callable[[Config], bool] = lambda cfg: False
    """Whether the export needs moetron's modeling code (Qwen3-MoE flavour ``moetron``)."""
    layer_name: Callable[[str, Config], str] = _same_name
    """moetron name -> the name ``renames`` start from, for names whose HF form needs the config."""
    copies: Callable[[str, Config], tuple[str, ...]] = _no_copies
    """moetron name -> extra HF keys holding a copy of that tensor (same shape and values)."""
    match_weights: Callable[[Mapping[str, Any], Collection[str]], tuple[Mapping[str, Any], str]] = _as_is
    """(config.json, the HF keys present) -> (config.json as the weights have it, a note for the user or ""):
    parts the config declares but the weights lack (DeepSeek's MTP layers, which transformers' save drops)."""
    ignored: Callable[[Mapping[str, Any]], tuple[str, ...]] = lambda hf: ()
    """config.json -> HF key prefixes from-hf leaves unread (GLM-4.5's MTP layers; ``match_weights`` says so)."""

    # ------------------------------------------------------------ config: HF -> moetron

    def model_settings(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        """{moetron path: value} that ``hf`` fixes; ConfigError (one line) for what moetron cannot represent."""
        bad = [f"{k}={hf[k]!r} (moetron: {v!r})" for k, v in self.unsupported.items() if k in hf and hf[k] != v]
        if bad:
            raise ConfigError(f"HF config: {self.model_type} options moetron cannot represent: {', '.join(bad)}")
        out = {path: hf_value(hf, key) for path, key in self.fields.items()}
        out.update(self.read(hf))
        out.update(self.sets)
        return out

    def merge_into_raw(self, raw: dict, hf: Mapping[str, Any]) -> dict:
        """Recipe dict + the HF model's architecture. A recipe value that contradicts the HF model is an error;
        ``soft`` values come from HF only when the recipe is silent."""
        raw = copy.deepcopy(raw)
        for path, value in self.model_settings(hf).items():
            current = _get(raw, path)
            if current is not NO_DEFAULT and current != value:
                raise ConfigError(f"recipe sets {path}={current!r} but the HF model has {value!r}; remove it from "
                                  "the recipe (the architecture comes from the HF config)")
            _put(raw, path, value)
        for path, key in self.soft.items():
            if hf.get(key.name) is not None and _get(raw, path) is NO_DEFAULT:
                _put(raw, path, hf_value(hf, key))
        return raw

    # ------------------------------------------------------------ config: moetron -> HF

    def export_problems(self, cfg: Config) -> list[str]:
        return [f"{path}={cfg_value(cfg, path)!r} (needs {want!r})" for path, want in self.export_requires.items()
                if cfg_value(cfg, path) != want] + self.check_export(cfg)

    def hf_config(self, cfg: Config, tokens: Mapping[str, int]) -> dict[str, Any]:
        """config.json for ``cfg`` (``tokens``: optional bos/eos/pad ids); ConfigError naming what cannot be
        written."""
        problems = self.export_problems(cfg)
        if problems:
            raise ConfigError(f"HF export as {self.model_type} cannot represent: {'; '.join(problems)}")
        out: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.model_type,
                               **self.unsupported, "tie_word_embeddings": False, "dtype": "float32"}
        out.update({key.name: cfg_value(cfg, path) for path, key in {**self.fields, **self.soft}.items()})
        out.update(self.write(cfg))
        out.update(tokens)
        return out

    # ------------------------------------------------------------ names

    def hf_name(self, name: str, cfg: Config) -> str:
        """The HF key of a (non-expert-stack) moetron name, or of an expert stack's module."""
        name = self.layer_name(name, cfg)
        key = name if name == "lm_head.weight" else "model." + name
        for pattern, repl in self.renames:
            key = re.sub(pattern, repl, key)
        return key

    def hf_keys(self, name: str, cfg: Config) -> list[str]:
        """The HF key(s) of moetron tensor ``name``: one, or one per expert for a stacked expert weight."""
        module, _, leaf = name.rpartition(".")
        if leaf in self.expert_names:
            return [f"{self.hf_name(module, cfg)}.{e}.{self.expert_names[leaf]}.weight"
                    for e in range(cfg.moe.num_experts)]
        return [self.hf_name(name, cfg)]


# ---------------------------------------------------------------- nested paths

def _get(raw: Mapping, path: str) -> Any:
    node: Any = raw
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return NO_DEFAULT
        node = node[part]
    return node


def _put(raw: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        raw = raw.setdefault(part, {})
    raw[leaf] = value


def cfg_value(cfg: Config, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


# ---------------------------------------------------------------- pieces families share

BASE_FIELDS = {"model.vocab_size": Key("vocab_size"), "model.hidden_size": Key("hidden_size"),
               "model.num_layers": Key("num_hidden_layers"), "model.num_attention_heads": Key("num_attention_heads"),
               "model.norm_eps": Key("rms_norm_eps", float, 1e-6)}
BASE_SOFT = {"model.seq_length": Key("max_position_embeddings"), "model.init_std": Key("initializer_range", float)}


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def inference_k(cfg: Config) -> list[int]:
    """The k of every MoE layer at inference: the config's evaluation k (``MoEConfig.eval_k_per_layer``)."""
    return cfg.moe.eval_k_per_layer(len(cfg.model.moe_layer_indices)) or [cfg.moe.top_k]


def gates_from_hf(hf: Mapping[str, Any], top_k: int, norm_default: bool) -> dict[str, Any]:
    """HF ``norm_topk_prob`` is ``moe.norm_topk_prob``; HF's renormalised top-1 gate is the value 1.0, moetron's
    straight-through top-1 gate (launcher/hf/families/qwen3_moe.py)."""
    norm = hf_value(hf, Key("norm_topk_prob", bool, norm_default))
    out: dict[str, Any] = {"moe.top_k": top_k, "moe.norm_topk_prob": norm}
    if norm and top_k == 1:
        out["moe.top1_gate"] = "straight_through"
    return out


_YARN_KEYS = {"factor": Key("factor", float, None, True),
              "original_max_position_embeddings": Key("original_max_position_embeddings", int, None, True),
              "beta_fast": Key("beta_fast", float, None, True), "beta_slow": Key("beta_slow", float, None, True),
              "mscale": Key("mscale", float, None, True), "mscale_all_dim": Key("mscale_all_dim", float, None, True),
              "attention_factor": Key("attention_factor", float, None, True),
              "truncate": Key("truncate", bool, True)}


def rope_from_hf(hf: Mapping[str, Any], yarn: bool) -> dict[str, Any]:
    """``model.rope_theta`` and ``model.rope_scaling.*`` from ``rope_parameters`` (transformers >= 5) or
    ``rope_scaling`` + ``rope_theta`` (older files). ``yarn``: whether the family's moetron block takes YaRN."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    require(isinstance(rope, Mapping), f"HF config: rope_parameters is {rope!r}, not an object")
    kind = rope.get("rope_type", rope.get("type", "default"))
    allowed = ("default", "yarn") if yarn else ("default",)
    require(kind in allowed, f"HF config: rope type {kind!r} is not supported for {hf.get('model_type')} (moetron: "
                             f"{', '.join(allowed)}); convert a model with rope_type {allowed[-1]!r}")
    known = {"rope_type", "type", "rope_theta", *(_YARN_KEYS if kind == "yarn" else ())}
    extra = sorted(set(rope) - known)
    require(not extra, f"HF config: rope_parameters {extra} cannot be represented by moetron ({kind} RoPE)")
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    require(theta is not None, "HF config: no rope_theta in rope_parameters or at the top level")
    out: dict[str, Any] = {"model.rope_theta": hf_value({"rope_theta": theta}, Key("rope_theta", float))}
    if kind == "yarn":
        values = {name: hf_value(rope, key) for name, key in _YARN_KEYS.items()}
        if values["original_max_position_embeddings"] is None:
            values["original_max_position_embeddings"] = hf_value(hf, Key("max_position_embeddings"))
        if values["factor"] is None:  # transformers: the context ratio
            values["factor"] = hf_value(hf, Key("max_position_embeddings")) / values["original_max_position_embeddings"]
        values["beta_fast"], values["beta_slow"] = values["beta_fast"] or 32.0, values["beta_slow"] or 1.0
        out["model.rope_scaling.type"] = "yarn"
        out.update({f"model.rope_scaling.{name}": v for name, v in values.items() if v is not None})
    return out


def rope_to_hf(cfg: Config) -> dict[str, Any]:
    """``rope_parameters`` for ``cfg``; an automatic YaRN attention factor and ``truncate: true`` are left out
    (transformers' defaults)."""
    rs = cfg.model.rope_scaling
    params: dict[str, Any] = {"rope_type": rs.type, "rope_theta": cfg.model.rope_theta}
    if rs.type == "yarn":
        auto = dataclasses.replace(rs, attention_factor=None).cos_sin_scale
        params.update({name: getattr(rs, name) for name in _YARN_KEYS if getattr(rs, name) is not None})
        if rs.attention_factor == auto:
            params.pop("attention_factor")
        if rs.truncate:
            params.pop("truncate")
    return {"rope_parameters": params}
