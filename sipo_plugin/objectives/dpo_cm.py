"""DPO-C&M: Diffusion-DPO with clipped and masked importance weights (arXiv 2505.21893).

The importance weight and its kappa calibration are this project's own formulation (the paper's
method section is not public in full): see ``importance.py`` and README "Objectives".
"""

from __future__ import annotations

import torch

from .configs import DPOCMConfig, check_kappa
from .diffusion_dpo import preference_logit, preference_loss, preference_metrics
from .errors import LossOutput, PairErrors
from .importance import (
    calibrated_kappa_config,
    clip_weight,
    geometric_mean,
    importance_weighted_objective,
    kappa_is_auto,
    mask_metrics,
    pair_mask,
)
from .registry import register_objective

__all__ = ["DPOCMConfig", "dpo_cm_loss", "check_kappa"]


def dpo_cm_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    weight_w: torch.Tensor,
    weight_l: torch.Tensor,
    *,
    beta: float,
    clip_eps: float,
    mask_threshold: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> LossOutput:
    """DPO-C&M (arXiv 2505.21893): per-pair ``-M * c * log sigmoid(u)``, every tensor ``[B]``.

    ``M = 1[w_w >= tau] 1[w_l >= tau]``, ``c = clip(sqrt(w_w w_l), 1 - eps, 1 + eps)`` (both
    stop-gradient), ``u = -(beta/2)(d_w - d_l)`` as in Diffusion-DPO.
    """
    weight_w, weight_l = weight_w.detach().float(), weight_l.detach().float()
    mask = pair_mask(weight_w, weight_l, mask_threshold)  # [B]
    c = geometric_mean(weight_w, weight_l).clamp(1.0 - clip_eps, 1.0 + clip_eps)  # [B]
    u = preference_logit(policy_err_w - ref_err_w, policy_err_l - ref_err_l, beta)  # [B]
    losses = mask * c * preference_loss(u, label_smoothing, loss_type)  # [B]
    metrics = preference_metrics(u, policy_err_w, policy_err_l, ref_err_w, ref_err_l)
    clipped_w, clipped_l = clip_weight(weight_w, clip_eps), clip_weight(weight_l, clip_eps)
    metrics.update(mask_metrics(mask, clipped_w, clipped_l))
    return LossOutput(losses, metrics)


@register_objective(name="dpo-cm", config_cls=DPOCMConfig, calibrate=calibrated_kappa_config,
                    needs_calibration=kappa_is_auto)
def dpo_cm_objective(pairs: PairErrors, config: DPOCMConfig) -> LossOutput:
    """DPO-C&M (arXiv 2505.21893): Diffusion-DPO scaled by clip(sqrt(w_w w_l)), pairs with a
    weight below tau masked.

    ``-M * clip(sqrt(w_w w_l)) * log sigmoid(u)``, the weights of ``config`` (:func:`dpo_cm_loss`).
    """
    return importance_weighted_objective(dpo_cm_loss, pairs, config)
