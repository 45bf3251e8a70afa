"""Preference objectives for diffusion models, behind a small plugin registry.

    from sipo_plugin.objectives import get_objective
    objective = get_objective("sipo", beta=5000.0)
    out = objective(model_pred, ref_pred, target, timesteps, scheduler)   # [2B, ...] winners first
    out.loss.backward(); print(out.metrics)

Built-ins: ``diffusion-dpo``, ``dpo-cm``, ``sipo``, ``sipo-1427``, ``sft``; more through the entry-point group
``sipo_plugin.objectives``. Usable without anything else in the package.
"""

from __future__ import annotations

from ..utils.lazy import lazy_getattr

__all__ = [
    "ENTRY_POINT_GROUP",
    "CalibrationSample",
    "DPOCMConfig",
    "DiffusionDPOConfig",
    "ImportanceWeights",
    "LossOutput",
    "Objective",
    "ObjectiveOutput",
    "ObjectiveSpec",
    "PairErrors",
    "SFTConfig",
    "SIPO1427Config",
    "SIPOConfig",
    "UnknownObjectiveError",
    "available_objectives",
    "calibrate_kappa",
    "describe_objectives",
    "diffusion_dpo_loss",
    "first_kept_timestep",
    "dpo_cm_loss",
    "get_objective",
    "get_objective_spec",
    "parametrization",
    "per_sample_error",
    "register_objective",
    "schedule_error_factor",
    "sft_loss",
    "sipo_1427_loss",
    "sipo_loss",
    "snr",
    "split_pair",
    "step_log_weight",
]

# the API loads (torch, the loss code, the built-ins' registration) on first use, so the
# torch-free parts (``configs``, ``catalog``, ``validation``) serve config parsing and --check
__getattr__ = lazy_getattr(__name__, dict.fromkeys(__all__, "_api"), globals())
