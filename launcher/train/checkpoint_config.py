"""Which settings define a checkpoint's model: a resumed run and an evaluation refuse any ``model.*``/``moe.*``
setting that differs from the checkpoint's stored config (a different shape would load wrongly or not at all),
except :data:`RESUME_MAY_DIFFER`."""
from __future__ import annotations

from typing import Any

RESUME_MAY_DIFFER = ("moe.dispatcher", "moe.llep", "moe.mone.backend", "moe.matryoshka.eval_k", "moe.aux_loss_coeff",
                     "moe.aux_loss_scope", "moe.z_loss_coeff", "moe.expert_bias_update_rate",
                     "moe.mone.balance_loss_coeff")
"""model.*/moe.* keys a resumed run (or an evaluation) may change: how tokens travel, which kernel runs, the eval k
and the weights of the auxiliary losses (training settings, not the model that is computed)."""


def model_changes(saved_config: dict, current: dict, world_size: int) -> list[str]:
    """``key saved -> current`` for every model.*/moe.* setting of the resolved config ``current`` that differs
    from the checkpoint's ``saved_config`` (resolved for ``world_size`` ranks first); :data:`RESUME_MAY_DIFFER`
    may. A resumed run and an evaluation refuse any (a different shape would load wrongly or not at all)."""
    from launcher.config import resolved_dict

    return config_differences(resolved_dict(saved_config, world_size), current)


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key saved -> current`` for every model.* / moe.* value that differs (except :data:`RESUME_MAY_DIFFER`);
    keys one side lacks (older checkpoints) are not compared."""
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    return [f"{key} {flat_saved[key]!r} -> {flat_current[key]!r}" for key in sorted(flat_saved)
            if key.split(".")[0] in ("model", "moe") and key in flat_current
            and not any(key == k or key.startswith(k + ".") for k in RESUME_MAY_DIFFER)
            and flat_saved[key] != flat_current[key]]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
