"""Importance weights of the weighted objectives (DPO-C&M, SIPO) and the kappa calibration.

This is the project's own formulation of arXiv 2505.21893's step-wise weight (the paper's method
section is not public in full; see README "Objectives"):

- ``weight_model="step"``: ``log w_y = -kappa * a_t * m_y`` with the schedule factor ``a_t`` of
  :func:`~sipo_plugin.objectives.schedule.schedule_error_factor` (``a_t * m_y = k_t * e_y``,
  ``k_t = 0.5 (SNR(t_prev) / SNR(t) - 1)``, ``e_y`` the epsilon-space error).
- ``weight_model="reference"``: ``log w_y = -kappa * (m_y - r_y)`` (sd-scripts PR #1427 reading).

Weights never carry gradient. ``a_t = +inf`` (DDPM ``t = 0``, flow ``s_prev <= 0``) gives
``w = 0`` whatever the error, so such pairs are masked for any ``mask_threshold > 0``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

from .errors import PairErrors, pair_timesteps, split_pair
from .schedule import num_train_timesteps, schedule_error_factor
from .configs import WEIGHT_MODELS
from .diffusion_dpo import add_sft_term
from .validation import check_float

__all__ = [
    "WEIGHT_MODELS",
    "ImportanceWeights",
    "calibrate_kappa",
    "calibrated_kappa_config",
    "clip_weight",
    "first_kept_timestep",
    "geometric_mean",
    "importance_weights",
    "kappa_is_auto",
    "mask_metrics",
    "pair_mask",
    "reference_log_weight",
    "step_log_weight",
    "weight_metrics",
]

_LOG_CLAMP = 1e4  # any finite log weight; keeps inf - inf (NaN) out of the geometric mean


def step_log_weight(err: torch.Tensor, error_factor: torch.Tensor, kappa: float) -> torch.Tensor:
    """``log w = -kappa * a_t * err`` (float64, no grad); ``a_t = inf`` gives ``-inf`` even at 0."""
    a_t = error_factor.to(torch.float64)
    log_w = -kappa * a_t * err.detach().to(torch.float64)  # [B]
    return torch.where(torch.isinf(a_t), torch.full_like(log_w, -math.inf), log_w)


def reference_log_weight(policy_err: torch.Tensor, ref_err: torch.Tensor, kappa: float):
    """``log w = -kappa * (m - r)`` (fp32, no grad): the policy/reference ratio weight."""
    return -kappa * (policy_err.detach().float() - ref_err.detach().float())


def importance_weights(
    pairs: PairErrors, *, weight_model: str, kappa: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unclipped) weights ``(w_w, w_l)``, each ``[B]`` fp32 without grad."""
    device = pairs.policy_err_w.device
    if weight_model == "step":
        a_t = schedule_error_factor(pairs.timesteps, pairs.scheduler)  # float64 (CPU on MPS)
        log_w = step_log_weight(pairs.policy_err_w.to(a_t.device), a_t, kappa)
        log_l = step_log_weight(pairs.policy_err_l.to(a_t.device), a_t, kappa)
    elif weight_model == "reference":
        log_w = reference_log_weight(pairs.policy_err_w, pairs.ref_err_w, kappa)
        log_l = reference_log_weight(pairs.policy_err_l, pairs.ref_err_l, kappa)
    else:
        raise ValueError(f"weight_model must be one of {WEIGHT_MODELS}, got {weight_model!r}")
    return log_w.exp().float().to(device), log_l.exp().float().to(device)


def clip_weight(weight: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """``clip(w, 1 - eps, 1 + eps)`` under stop-gradient."""
    return weight.detach().clamp(1.0 - clip_eps, 1.0 + clip_eps)


def geometric_mean(weight_w: torch.Tensor, weight_l: torch.Tensor) -> torch.Tensor:
    """``sqrt(w_w * w_l)`` in log space; ``inf * 0`` gives 1, not NaN (infinite logs clamped)."""
    log_w = weight_w.detach().log().clamp(-_LOG_CLAMP, _LOG_CLAMP)
    log_l = weight_l.detach().log().clamp(-_LOG_CLAMP, _LOG_CLAMP)
    return (0.5 * (log_w + log_l)).exp()


def pair_mask(weight_w: torch.Tensor, weight_l: torch.Tensor, mask_threshold: float):
    """``M = 1[w_w >= tau] * 1[w_l >= tau]`` as a float ``[B]`` tensor (1 keeps the pair)."""
    return ((weight_w >= mask_threshold) & (weight_l >= mask_threshold)).to(weight_w.dtype)


def mask_metrics(mask: torch.Tensor, clipped_w: torch.Tensor, clipped_l: torch.Tensor):
    """``mask_fraction`` (share of masked pairs) and the mean clipped weight per side."""
    return {
        "mask_fraction": 1.0 - mask.mean(),
        "weights/chosen": clipped_w.mean(),
        "weights/rejected": clipped_l.mean(),
    }


@dataclasses.dataclass(frozen=True, eq=False)
class ImportanceWeights:
    """A pair batch's importance weights and how DPO-C&M and SIPO apply them.

    ``weight_w``, ``weight_l``: the raw weights ``w_w, w_l`` ``[B]``, kept fp32 without grad
    (stop-gradient); ``clip_eps``: a weight is clipped to ``[1 - eps, 1 + eps]``;
    ``mask_threshold``: ``tau`` of the pair mask ``M = 1[w_w >= tau] 1[w_l >= tau]``.
    """

    weight_w: torch.Tensor
    weight_l: torch.Tensor
    clip_eps: float
    mask_threshold: float

    def __post_init__(self) -> None:  # stop-gradient and fp32, however the weights were made
        object.__setattr__(self, "weight_w", self.weight_w.detach().float())
        object.__setattr__(self, "weight_l", self.weight_l.detach().float())

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """``M`` ``[B]``: 1 keeps the pair, 0 masks it."""
        return pair_mask(self.weight_w, self.weight_l, self.mask_threshold)

    @functools.cached_property
    def clipped(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_w, c_l) = (clip(w_w), clip(w_l))``, ``[B]`` each."""
        return self.clip(self.weight_w), self.clip(self.weight_l)

    def clip(self, weight: torch.Tensor) -> torch.Tensor:
        """``clip(weight, 1 - eps, 1 + eps)`` under stop-gradient."""
        return clip_weight(weight, self.clip_eps)

    def metrics(self) -> dict[str, torch.Tensor]:
        """:func:`mask_metrics`: the masked share and the mean clipped weight of each side."""
        return mask_metrics(self.mask, *self.clipped)


def weight_metrics(
    weight_w: torch.Tensor,
    weight_l: torch.Tensor,
    timesteps: torch.Tensor,
    num_timesteps: int,
    kappa: float,
) -> dict[str, torch.Tensor | float]:
    """``kappa`` and the mean raw weight (both sides) per tenth of the schedule in the batch.

    Keys ``weights_by_t/000-099`` ... ``weights_by_t/900-999`` for 1000 training timesteps; a
    tenth without a pair in the batch is NaN (computed on the device, no host read: see
    ``LossOutput``).
    """
    raw = 0.5 * (weight_w.detach() + weight_l.detach())  # [B]
    t = timesteps.to(raw.device, torch.float32)
    bucket = torch.div(t * 10, num_timesteps, rounding_mode="floor").long().clamp(0, 9)  # [B]
    one_hot = bucket[None, :] == torch.arange(10, device=raw.device)[:, None]  # [10, B]
    sums = torch.where(one_hot, raw[None, :], torch.zeros_like(raw)).sum(dim=1)  # [10]
    means = sums / one_hot.sum(dim=1)  # [10], NaN (0/0) where empty
    metrics: dict[str, torch.Tensor | float] = {"kappa": float(kappa)}
    for b in range(10):
        lo, hi = b * num_timesteps // 10, (b + 1) * num_timesteps // 10 - 1
        metrics[f"weights_by_t/{lo:03d}-{hi:03d}"] = means[b]
    return metrics


def _pair_scores(ref_errors: Any, timesteps: Any, scheduler: Any) -> torch.Tensor:
    """Per pair ``q = a_t * max(r_w, r_l)`` (float64): masked iff ``kappa * q > -log(tau)``."""
    return _scored_pairs(ref_errors, timesteps, scheduler)[0]


def _scored_pairs(ref_errors: Any, timesteps: Any, scheduler: Any):
    """``(q [N], t [N])``: :func:`_pair_scores` and each pair's timestep, over every batch."""
    if isinstance(ref_errors, torch.Tensor):
        ref_errors, timesteps = [ref_errors], [timesteps]
    if isinstance(timesteps, torch.Tensor) or len(ref_errors) != len(timesteps):
        raise ValueError(
            "pass ref_errors and timesteps as two tensors or two lists of equal length"
        )
    scores, pair_ts = [], []
    for r, t in zip(ref_errors, timesteps, strict=True):
        r_w, r_l = split_pair(r.detach().reshape(-1).cpu().to(torch.float64))  # [B] each
        t_pair = pair_timesteps(torch.as_tensor(t).cpu(), r_w.shape[0])  # [B]
        a_t = schedule_error_factor(t_pair, scheduler).cpu()
        q = a_t * torch.maximum(r_w, r_l)
        scores.append(torch.where(torch.isinf(a_t), torch.full_like(q, math.inf), q))
        pair_ts.append(t_pair)
    return torch.cat(scores), torch.cat(pair_ts)


def _threshold_for_count(scores: torch.Tensor, k: int) -> float:
    """A score threshold with ``k`` scores strictly above it (ties and forced masks aside)."""
    q = scores.sort(descending=True).values.tolist()
    finite = [x for x in q if 0 < x < math.inf]
    if not finite:
        raise ValueError(
            "cannot calibrate kappa: no calibration pair has a finite, positive weight exponent "
            "(all reference errors are 0 or every timestep is t = 0): set kappa to a number"
        )
    upper = q[k - 1] if k > 0 else math.inf
    lower = q[k] if k < len(q) else 0.0
    if upper <= 0:
        raise ValueError(
            f"cannot calibrate kappa: masking {k} of {len(q)} pairs needs {k} positive weight "
            f"exponents, found {sum(x > 0 for x in q)}: lower target_mask_fraction or set kappa"
        )
    if lower == math.inf:  # more than k pairs sit at t = 0 and are masked anyway
        return 2.0 * max(finite)
    if upper == math.inf:
        return 2.0 * lower if lower > 0 else 2.0 * max(finite)
    if lower <= 0:
        return 0.5 * upper
    return math.sqrt(lower * upper)


def calibrate_kappa(
    ref_errors: torch.Tensor | Sequence[torch.Tensor],
    timesteps: torch.Tensor | Sequence[torch.Tensor],
    scheduler: Any,
    *,
    mask_threshold: float = 0.9,
    target_mask_fraction: float = 0.06,
) -> float:
    """kappa at which the step-wise weights mask ``target_mask_fraction`` of the pairs at ``tau``.

    ``ref_errors`` is one ``[2B]`` winners-first tensor of reference errors (``per_sample_error``
    of the reference prediction), or a list of them with a matching list of ``[B]``/``[2B]``
    timesteps. The reference stands in for the policy (they are equal before training). A pair is
    masked iff ``kappa * a_t * max(r_w, r_l) > -log(tau)``; kappa is placed at the geometric mean of
    the two pair scores either side of ``round(target * N)`` masked pairs (N = number of pairs), so
    the calibration batches are masked at the target fraction up to ties and 1/N rounding.
    """
    tau = check_float(
        "mask_threshold", mask_threshold, low=0.0, high=1.0, low_open=True, high_open=True
    )
    target = check_float(
        "target_mask_fraction", target_mask_fraction, low=0.0, high=1.0, high_open=True
    )
    scores = _pair_scores(ref_errors, timesteps, scheduler)  # [N]
    k = int(math.floor(target * scores.numel() + 0.5))
    return -math.log(tau) / _threshold_for_count(scores, k)


def kappa_is_auto(config: Any) -> bool:
    """SIPO's and DPO-C&M's ``needs_calibration``: while ``kappa`` is ``"auto"``."""
    return isinstance(config.kappa, str) and config.kappa == "auto"


def calibrated_kappa_config(config: Any, sample: Any, scheduler: Any) -> Any:
    """SIPO's and DPO-C&M's calibration hook: the config with ``kappa = calibrate_kappa(...)``
    on the sample's reference errors and timesteps, at its ``mask_threshold`` and
    ``target_mask_fraction``."""
    errors, timesteps = sample
    kappa = calibrate_kappa(errors, timesteps, scheduler, mask_threshold=config.mask_threshold,
                            target_mask_fraction=config.target_mask_fraction)
    return dataclasses.replace(config, kappa=kappa)


def first_kept_timestep(
    ref_errors: torch.Tensor | Sequence[torch.Tensor],
    timesteps: torch.Tensor | Sequence[torch.Tensor],
    scheduler: Any,
    *,
    kappa: float,
    mask_threshold: float,
) -> int:
    """``t_0``: every calibration pair at a timestep below ``t_0`` is masked by the step-wise weight.

    A pair is masked iff ``kappa * a_t * max(r_w, r_l) > -log(tau)`` (as in :func:`calibrate_kappa`,
    the reference standing in for the policy). With ``t_k`` the smallest timestep of a kept pair,
    ``t_0 = 1 + max{t_i : t_i < t_k}`` over the calibration pairs (0 when the least noisy pair is
    kept, or when every pair is masked). Drawing ``t`` uniformly from ``[t_0, T)`` and scaling the
    loss by ``(T - t_0) / T`` leaves the expected loss unchanged wherever those timesteps are
    masked: ``(1/T) sum_t L(t) = ((T - t_0)/T) * (1/(T - t_0)) sum_{t >= t_0} L(t)``.
    """
    scores, t = _scored_pairs(ref_errors, timesteps, scheduler)  # [N] each
    masked = kappa * scores > -math.log(mask_threshold)  # [N]
    if bool(masked.all()) or not bool(masked.any()):
        return 0
    below = t[t < t[~masked].min()]
    return int(below.max().item()) + 1 if below.numel() else 0


def objective_weight_metrics(pairs: PairErrors, weight_w, weight_l, kappa: float) -> dict:
    """:func:`weight_metrics` for the pairs' timesteps and scheduler."""
    return weight_metrics(
        weight_w, weight_l, pairs.timesteps, num_train_timesteps(pairs.scheduler), kappa
    )


def importance_weighted_objective(loss_fn, pairs: PairErrors, config, **settings):
    """DPO-C&M's and SIPO's shared body: ``loss_fn(pairs, weights, beta, label_smoothing,
    loss_type, **settings)`` with the :class:`ImportanceWeights` of ``config``'s weight_model,
    kappa, clip_eps and mask_threshold, plus the winner-SFT term and the weight metrics."""
    weights = ImportanceWeights(
        *importance_weights(pairs, weight_model=config.weight_model, kappa=config.kappa),
        clip_eps=config.clip_eps, mask_threshold=config.mask_threshold,
    )
    output = loss_fn(pairs, weights, beta=config.beta, label_smoothing=config.label_smoothing,
                     loss_type=config.loss_type, **settings)
    output = add_sft_term(output, pairs.policy_err_w, config.sft_weight)
    output.metrics.update(
        objective_weight_metrics(pairs, weights.weight_w, weights.weight_l, config.kappa))
    return output
