"""DPO-C&M: Diffusion-DPO with clipped and masked importance weights (arXiv 2505.21893).

The importance weight and its kappa calibration are this project's own formulation (the paper's
method section is not public in full): see ``importance.py`` and README "Objectives".
"""

from __future__ import annotations

from .configs import DPOCMConfig, check_kappa
from .diffusion_dpo import preference_logit, preference_loss, preference_metrics
from .errors import LossOutput, PairErrors
from .importance import (
    ImportanceWeights,
    calibrated_kappa_config,
    geometric_mean,
    importance_weighted_objective,
    kappa_is_auto,
)
from .registry import register_objective

__all__ = ["DPOCMConfig", "dpo_cm_loss", "check_kappa"]


def dpo_cm_loss(
    errors: PairErrors,
    weights: ImportanceWeights,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> LossOutput:
    """DPO-C&M (arXiv 2505.21893): per-pair ``-M * c * log sigmoid(u)``, every tensor ``[B]``.

    ``M = 1[w_w >= tau] 1[w_l >= tau]``, ``c = clip(sqrt(w_w w_l), 1 - eps, 1 + eps)`` (both
    stop-gradient; ``w``, ``tau`` and ``eps`` from ``weights``), ``u = -(beta/2)(d_w - d_l)`` as
    in Diffusion-DPO (``d_y = m_y - r_y``, the errors of ``errors``).
    """
    m_w, m_l = errors.policy_err_w, errors.policy_err_l  # [B] each, with grad
    r_w, r_l = errors.ref_err_w, errors.ref_err_l  # [B] each
    c = weights.clip(geometric_mean(weights.weight_w, weights.weight_l))  # [B]
    u = preference_logit(m_w - r_w, m_l - r_l, beta)  # [B]
    losses = weights.mask * c * preference_loss(u, label_smoothing, loss_type)  # [B]
    metrics = preference_metrics(u, m_w, m_l, r_w, r_l)
    return LossOutput(losses, {**metrics, **weights.metrics()})


@register_objective(name="dpo-cm", config_cls=DPOCMConfig, calibrate=calibrated_kappa_config,
                    needs_calibration=kappa_is_auto)
def dpo_cm_objective(pairs: PairErrors, config: DPOCMConfig) -> LossOutput:
    """DPO-C&M (arXiv 2505.21893): Diffusion-DPO scaled by clip(sqrt(w_w w_l)), pairs with a
    weight below tau masked.

    ``-M * clip(sqrt(w_w w_l)) * log sigmoid(u)``, the weights of ``config`` (:func:`dpo_cm_loss`).
    """
    return importance_weighted_objective(dpo_cm_loss, pairs, config)
