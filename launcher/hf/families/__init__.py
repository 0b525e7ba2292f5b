"""The Hugging Face families ``moetron convert`` reads and writes, one small file each (launcher/hf/family.py says
what a family declares). Adding a family = one file + one entry in :data:`FAMILIES`."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from launcher.config import Config, ConfigError
from launcher.hf.family import Family
from launcher.hf.families import deepseek_v3, glm4_moe, llama, mixtral, olmoe, qwen2_moe, qwen3, qwen3_moe

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    qwen3.FAMILY, llama.FAMILY, qwen3_moe.FAMILY, deepseek_v3.FAMILY, qwen2_moe.FAMILY, mixtral.FAMILY, olmoe.FAMILY,
    glm4_moe.FAMILY)}
"""model_type -> family; to-hf tries them in this order (the dense families first: an all-dense model is Qwen3 or
Llama, not a Qwen3-MoE without MoE layers). No two families represent the same model."""


def for_hf(hf: Mapping[str, Any]) -> Family:
    """The family of a config.json (its ``model_type``)."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        hint = (" (a moetron-flavour export: keep the moetron checkpoint it came from)"
                if model_type == qwen3_moe.CUSTOM_MODEL_TYPE else "")
        raise ConfigError(f"HF config: model_type {model_type!r} is not supported{hint}; from-hf converts "
                          f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def for_export(cfg: Config, model_type: Optional[str] = None) -> Family:
    """``model_type``'s family, or the first family that can represent ``cfg``; ConfigError naming what the
    closest families (fewest mismatches first, at most three) cannot represent."""
    if model_type is not None:
        if model_type not in FAMILIES:
            raise ConfigError(f"--model-type {model_type!r} is not supported; to-hf writes {', '.join(FAMILIES)}")
        return FAMILIES[model_type]
    problems = {name: f.export_problems(cfg) for name, f in FAMILIES.items()}
    for name, found in problems.items():
        if not found:
            return FAMILIES[name]
    closest = sorted(problems.items(), key=lambda item: len(item[1]))[:3]
    raise ConfigError("no Hugging Face family represents this model; the closest: " + " | ".join(
        f"{name}: {'; '.join(found)}" for name, found in closest))
