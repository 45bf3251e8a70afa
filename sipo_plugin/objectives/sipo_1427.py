"""``sipo-1427``: sd-scripts pull request #1427's reading of SDPO (arXiv 2505.21893), for comparison.

Read from kohya-ss/sd-scripts pull request #1427 (rockerBOO, "Add preference optimization
(Diffusion-DPO, MaPO)", later extended with SDPO), ``library/custom_train_functions.py`` as stored
at commit 4f27c6a0: ``compute_importance_weight`` (``w = exp(-loss + ref_loss)``),
``clip_importance_weight`` (``clamp(w, 1 - eps, 1 + eps)``) and ``sdpo_loss`` ("Formula 11",
inverse weighting with clipping "Formula 12"), with its test
``tests/library/test_custom_train_functions_sdpo.py``. There, on the unreduced element-wise
losses ``[2B, C, H, W]`` (policy ``loss``, reference ``ref_loss``):

    w_y   = exp(-(loss_y - ref_loss_y))                      per element, NOT detached
    v_y   = clip(1 / (w_y + 1e-8), 1 - eps, 1 + eps)         inverse weight, clipped
    c     = max(v_w, v_l)                                    one weight shared by the pair
    logit = c * beta_pr * (-(loss_w - ref_w)) - c * beta_pr * (-(loss_l - ref_l))
    loss  = mean over C, H, W of -log sigmoid(logit)         (defaults beta_pr 0.02, eps 0.1)

How it differs from this project's ``sipo`` (importance.py): the weight is the policy/reference
ratio rather than the step-wise one, it is inverted, gradient flows through it (where the clip is
not active), one weight per pair (the larger), and there is no mask. Here, in the project's
notation (``d_y = m_y - r_y``, beta convention ``u = -(beta/2)(...)``, so ``beta = 2 beta_pr``):

    v_y = clip(exp(kappa * d_y), 1 - eps, 1 + eps)          (gradient through d_y kept)
    c   = max(v_w, v_l)
    u   = -(beta/2) * c * (d_w - d_l)
    loss = mean over non-batch dims of -log sigmoid(u)

``kappa = 1`` is the PR's exact weight (``exp(d)`` equals its ``1 / (exp(-d) + 1e-8)`` to a relative
1e-8). The registered objective receives the trainer's per-sample errors ``[B]`` (mean over the
latent), so its weight and sigmoid act per pair; :func:`sipo_1427_loss` also takes element-wise
errors ``[B, ...]``, which is the PR's own granularity. At ``policy == reference``: ``c = 1``,
loss ``ln 2`` and the same gradient as Diffusion-DPO.
"""

from __future__ import annotations

import torch

from .configs import SIPO1427Config
from .diffusion_dpo import pair_objective, preference_logit, preference_loss, preference_metrics
from .errors import LossOutput, PairErrors
from .registry import register_objective

__all__ = ["SIPO1427Config", "inverse_weight", "sipo_1427_loss"]


def inverse_weight(d: torch.Tensor, kappa: float, clip_eps: float) -> torch.Tensor:
    """``clip(exp(kappa * d), 1 - eps, 1 + eps)`` with its gradient (zero where clipped)."""
    return torch.exp(kappa * d).clamp(1.0 - clip_eps, 1.0 + clip_eps)


def sipo_1427_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    clip_eps: float,
    kappa: float = 1.0,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> LossOutput:
    """PR #1427's SDPO: per pair, mean over non-batch dims of ``-log sigmoid(u)``.

    ``u = -(beta/2) max(v_w, v_l) (d_w - d_l)``, ``v_y = clip(exp(kappa d_y), 1-eps, 1+eps)`` not
    detached; inputs ``[B]`` or element-wise ``[B, ...]`` (all the same shape), losses ``[B]``.
    """
    d_w, d_l = policy_err_w - ref_err_w, policy_err_l - ref_err_l  # [B, ...] each
    v_w, v_l = inverse_weight(d_w, kappa, clip_eps), inverse_weight(d_l, kappa, clip_eps)
    c = torch.maximum(v_w, v_l)  # [B, ...], one weight per pair (element)
    u_is = c * preference_logit(d_w, d_l, beta)  # [B, ...]
    elementwise = preference_loss(u_is, label_smoothing, loss_type)  # [B, ...]
    losses = elementwise.reshape(elementwise.shape[0], -1).mean(dim=1)  # [B]
    metrics = preference_metrics(preference_logit(d_w, d_l, beta), policy_err_w, policy_err_l,
                                 ref_err_w, ref_err_l)
    clipped = (c.detach() <= 1.0 - clip_eps) | (c.detach() >= 1.0 + clip_eps)
    metrics.update({
        "weights/chosen": v_w.detach().mean(),
        "weights/rejected": v_l.detach().mean(),
        "weights/shared": c.detach().mean(),
        "weights/clipped_fraction": clipped.float().mean(),
    })
    return LossOutput(losses, metrics)


@register_objective(name="sipo-1427", config_cls=SIPO1427Config)
def sipo_1427_objective(pairs: PairErrors, config: SIPO1427Config) -> LossOutput:
    """SDPO as read by sd-scripts PR #1427: shared max of clipped inverse policy/reference
    weights, with gradient, no mask.

    ``-log sigmoid(-(beta/2) max(v_w, v_l)(d_w - d_l))``, ``v = clip(exp(kappa d))``.
    """
    return pair_objective(sipo_1427_loss, pairs, config, clip_eps=config.clip_eps,
                          kappa=config.kappa)
