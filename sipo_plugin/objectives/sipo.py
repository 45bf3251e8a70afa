"""SIPO / SDPO: importance-reweighted Diffusion-DPO log-ratios (arXiv 2505.21893).

Weights and kappa calibration as in DPO-C&M (``importance.py``: this project's formulation).
"""

from __future__ import annotations

import torch

from .diffusion_dpo import preference_logit, preference_loss, preference_metrics
from .configs import PAIR_WEIGHTS, SIPOConfig
from .errors import LossOutput, PairErrors
from .importance import (
    ImportanceWeights,
    calibrated_kappa_config,
    importance_weighted_objective,
    kappa_is_auto,
)
from .registry import register_objective
from .validation import check_choice

__all__ = ["PAIR_WEIGHTS", "SIPOConfig", "sipo_loss"]


def sipo_loss(
    errors: PairErrors,
    weights: ImportanceWeights,
    *,
    beta: float,
    pair_weight: str = "per_side",
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> LossOutput:
    """SIPO (arXiv 2505.21893): per-pair ``-M * log sigmoid(u_is)``, every tensor ``[B]``.

    ``c_y = clip(w_y, 1 - eps, 1 + eps)`` (stop-gradient), ``u_is = -(beta/2)(c_w d_w - c_l d_l)``
    (``per_side``) or ``-(beta/2) max(c_w, c_l) (d_w - d_l)`` (``shared_max``, formula 11 as read
    by sd-scripts PR #1427); ``M = 1[w_w >= tau] 1[w_l >= tau]``; ``w``, ``tau`` and ``eps`` from
    ``weights``, ``d_y = m_y - r_y`` the errors of ``errors``.
    """
    pair_weight = check_choice("pair_weight", pair_weight, PAIR_WEIGHTS)
    m_w, m_l = errors.policy_err_w, errors.policy_err_l  # [B] each, with grad
    r_w, r_l = errors.ref_err_w, errors.ref_err_l  # [B] each
    c_w, c_l = weights.clipped  # [B] each
    d_w, d_l = m_w - r_w, m_l - r_l  # [B] each
    if pair_weight == "shared_max":
        u_is = torch.maximum(c_w, c_l) * preference_logit(d_w, d_l, beta)
    else:
        u_is = preference_logit(c_w * d_w, c_l * d_l, beta)
    losses = weights.mask * preference_loss(u_is, label_smoothing, loss_type)  # [B]
    u = preference_logit(d_w, d_l, beta)  # unweighted, for comparable metrics
    metrics = preference_metrics(u, m_w, m_l, r_w, r_l)
    return LossOutput(losses, {**metrics, **weights.metrics()})


@register_objective(name="sipo", config_cls=SIPOConfig, calibrate=calibrated_kappa_config,
                    needs_calibration=kappa_is_auto)
def sipo_objective(pairs: PairErrors, config: SIPOConfig) -> LossOutput:
    """SIPO/SDPO (arXiv 2505.21893): DPO on clipped importance-weighted log-ratios, low-weight
    pairs masked.

    ``-M * log sigmoid(-(beta/2)(c_w d_w - c_l d_l))``, the weights of ``config``
    (:func:`sipo_loss`).
    """
    return importance_weighted_objective(sipo_loss, pairs, config, pair_weight=config.pair_weight)
