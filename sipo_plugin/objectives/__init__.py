"""Preference objectives for diffusion models, behind a small plugin registry.

    from sipo_plugin.objectives import get_objective
    objective = get_objective("sipo", beta=5000.0)
    out = objective(model_pred, ref_pred, target, timesteps, scheduler)   # [2B, ...] winners first
    out.loss.backward(); print(out.metrics)

Built-ins: ``diffusion-dpo``, ``dpo-cm``, ``sipo``, ``sft``; more through the entry-point group
``sipo_plugin.objectives``. Usable without anything else in the package.
"""

from .errors import LossOutput, PairErrors, per_sample_error, split_pair
from .registry import (
    ENTRY_POINT_GROUP,
    Objective,
    ObjectiveOutput,
    ObjectiveSpec,
    UnknownObjectiveError,
    available_objectives,
    describe_objectives,
    get_objective,
    register_objective,
)
from .importance import calibrate_kappa, first_kept_timestep, step_log_weight
from .schedule import parametrization, schedule_error_factor, snr

# Built-in objectives register themselves on import.
from .diffusion_dpo import DiffusionDPOConfig, diffusion_dpo_loss  # noqa: E402
from .dpo_cm import DPOCMConfig, dpo_cm_loss  # noqa: E402
from .sipo import SIPOConfig, sipo_loss  # noqa: E402
from .sft import SFTConfig, sft_loss  # noqa: E402

__all__ = [
    "ENTRY_POINT_GROUP",
    "DPOCMConfig",
    "DiffusionDPOConfig",
    "LossOutput",
    "Objective",
    "ObjectiveOutput",
    "ObjectiveSpec",
    "PairErrors",
    "SFTConfig",
    "SIPOConfig",
    "UnknownObjectiveError",
    "available_objectives",
    "calibrate_kappa",
    "describe_objectives",
    "first_kept_timestep",
    "diffusion_dpo_loss",
    "dpo_cm_loss",
    "get_objective",
    "parametrization",
    "per_sample_error",
    "register_objective",
    "schedule_error_factor",
    "sft_loss",
    "sipo_loss",
    "snr",
    "split_pair",
    "step_log_weight",
]
