"""Parametrization and signal-to-noise ratio read from a diffusers scheduler.

Two scheduler families are understood:

- DDPM family (``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``, ...): integer
  timesteps index ``scheduler.alphas_cumprod``; ``config.prediction_type`` is ``"epsilon"`` or
  ``"v_prediction"``; ``SNR(t) = abar_t / (1 - abar_t)`` and ``t_prev = t - 1``.
- Rectified flow (``FlowMatchEulerDiscreteScheduler``, or any scheduler whose
  ``config.prediction_type`` is ``"flow_prediction"``): ``x_t = (1 - s) x0 + s eps`` with
  ``s = t / N`` (``N = num_train_timesteps``); ``SNR(s) = ((1 - s) / s)^2`` and
  ``s_prev = s - 1 / N``.

Schedule quantities are computed in float64.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "PARAMETRIZATIONS",
    "parametrization",
    "num_train_timesteps",
    "snr",
    "schedule_error_factor",
]

PARAMETRIZATIONS = ("epsilon", "v_prediction", "flow")
_DDPM_PREDICTION_TYPES = ("epsilon", "v_prediction")


def _config_value(scheduler: Any, key: str) -> Any:
    config = getattr(scheduler, "config", None)
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def parametrization(scheduler: Any) -> str:
    """Return ``"epsilon"``, ``"v_prediction"`` or ``"flow"`` for a diffusers scheduler."""
    prediction_type = _config_value(scheduler, "prediction_type")
    name = type(scheduler).__name__
    if name.startswith("FlowMatch") or prediction_type == "flow_prediction":
        return "flow"
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(
            f"unsupported scheduler {name}: expected a DDPM-family scheduler (with alphas_cumprod "
            "and config.prediction_type) or FlowMatchEulerDiscreteScheduler"
        )
    if prediction_type not in _DDPM_PREDICTION_TYPES:
        raise ValueError(
            f"unsupported prediction_type {prediction_type!r} of {name}: the objectives support "
            f"{', '.join(_DDPM_PREDICTION_TYPES)} (DDPM family) and rectified flow"
        )
    return prediction_type


def num_train_timesteps(scheduler: Any) -> int:
    """The scheduler's ``num_train_timesteps`` (the length of ``alphas_cumprod`` as a fallback)."""
    n = _config_value(scheduler, "num_train_timesteps")
    if n is None and hasattr(scheduler, "alphas_cumprod"):
        n = len(scheduler.alphas_cumprod)
    if n is None or int(n) <= 0:
        raise ValueError(f"cannot read num_train_timesteps from {type(scheduler).__name__}")
    return int(n)


def _work_device(t: torch.Tensor) -> torch.device:
    # float64 is unavailable on MPS: compute the tiny [B] schedule tensors on the CPU there.
    return torch.device("cpu") if t.device.type == "mps" else t.device


def _on_host(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values costs no device sync: the checks below run only then (the
    trainer's timesteps on an accelerator are the adapter's own draws; a check there would stall
    the host on every micro-batch)."""
    return t.device.type == "cpu"


def _ddpm_indices(timesteps: torch.Tensor, scheduler: Any) -> torch.Tensor:
    t = torch.as_tensor(timesteps).reshape(-1)
    t = t.to(_work_device(t))
    n = len(scheduler.alphas_cumprod)
    if _on_host(t):
        bad = (t < 0) | (t > n - 1)
        if t.is_floating_point():
            bad = bad | (t != t.round())
        if bool(bad.any()):
            raise ValueError(f"DDPM timesteps must be integers in [0, {n - 1}], got {t.tolist()}")
    return t.round().long()


def _flow_sigmas(timesteps: torch.Tensor, scheduler: Any) -> tuple[torch.Tensor, float]:
    t = torch.as_tensor(timesteps).reshape(-1)
    n = num_train_timesteps(scheduler)
    s = t.to(_work_device(t), torch.float64) / n
    if _on_host(s) and bool(((s < 0) | (s > 1 + 1e-6) | s.isnan()).any()):
        raise ValueError(f"flow timesteps must lie in [0, {n}] (sigma * {n}), got {t.tolist()}")
    return s.clamp(max=1.0), 1.0 / n


def _ddpm_snr_terms(idx: torch.Tensor, scheduler: Any):
    abar_all = scheduler.alphas_cumprod.to(idx.device, torch.float64)  # [T]
    abar = abar_all[idx]  # [B]
    abar_prev = torch.where(idx > 0, abar_all[(idx - 1).clamp(min=0)], torch.ones_like(abar))
    snr_t = abar / (1 - abar)  # abar = 0 (zero terminal SNR) -> 0
    snr_prev = abar_prev / (1 - abar_prev)  # t = 0 -> abar_prev = 1 -> +inf
    return abar, snr_prev, snr_t


def snr(timesteps: torch.Tensor, scheduler: Any) -> torch.Tensor:
    """Signal-to-noise ratio ``[B]`` (float64) of the timesteps under the scheduler."""
    if parametrization(scheduler) == "flow":
        s, _ = _flow_sigmas(timesteps, scheduler)
        return ((1 - s) / s).square()
    idx = _ddpm_indices(timesteps, scheduler)
    return _ddpm_snr_terms(idx, scheduler)[2]


def schedule_error_factor(timesteps: torch.Tensor, scheduler: Any) -> torch.Tensor:
    """Per-pair factor ``a_t = 0.5 * (SNR(t_prev) - SNR(t)) * x0_factor`` ``[B]`` (float64).

    ``a_t * m`` equals ``k_t * e`` of the spec with ``k_t = 0.5 * (SNR(t_prev) / SNR(t) - 1)`` and
    ``e`` the epsilon-space error, but stays finite where ``SNR(t) = 0``. ``x0_factor`` turns the
    native per-element error ``m`` into the x0 error: ``(1 - abar) / abar`` (epsilon),
    ``1 - abar`` (v_prediction), ``s^2`` (flow). Where ``SNR(t_prev)`` is infinite (DDPM ``t = 0``,
    flow ``s_prev <= 0``), or the factor is otherwise undefined, ``a_t = +inf``: the step-wise
    weight is 0 there.
    """
    kind = parametrization(scheduler)
    if kind == "flow":
        s, ds = _flow_sigmas(timesteps, scheduler)
        s_prev = s - ds
        snr_t = ((1 - s) / s).square()
        snr_prev = ((1 - s_prev) / s_prev).square()
        a_t = 0.5 * (snr_prev - snr_t) * s.square()
        undefined = s_prev <= 0
    else:
        idx = _ddpm_indices(timesteps, scheduler)
        abar, snr_prev, snr_t = _ddpm_snr_terms(idx, scheduler)
        x0_factor = (1 - abar) / abar if kind == "epsilon" else 1 - abar
        a_t = 0.5 * (snr_prev - snr_t) * x0_factor
        undefined = idx == 0
    return torch.where(undefined | a_t.isnan(), torch.full_like(a_t, float("inf")), a_t)
