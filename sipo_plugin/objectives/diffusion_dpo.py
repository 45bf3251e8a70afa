"""Diffusion-DPO (Wallace et al., arXiv 2311.12908; SalesforceAIResearch/DiffusionDPO train.py).

Also the shared pieces of the DPO family: the preference loss of a logit ``u`` (sigmoid, label
smoothing, hinge), the TRL-named metrics and the optional winner-SFT term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .configs import LOSS_TYPES, DiffusionDPOConfig
from .errors import LossOutput, PairErrors
from .registry import register_objective

__all__ = [
    "LOSS_TYPES",
    "DiffusionDPOConfig",
    "add_sft_term",
    "diffusion_dpo_loss",
    "preference_logit",
    "preference_loss",
    "preference_metrics",
]


def preference_logit(d_w: torch.Tensor, d_l: torch.Tensor, beta: float) -> torch.Tensor:
    """``u = -(beta/2) * (d_w - d_l)``: ``[B]``."""
    return -0.5 * beta * (d_w - d_l)


def preference_loss(u: torch.Tensor, label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """Per-pair loss of the logit ``u`` ``[B]``.

    sigmoid: ``-(1 - a) log sigmoid(u) - a log sigmoid(-u)``; hinge: ``max(0, 1 - u)``.
    """
    if loss_type == "hinge":
        if label_smoothing:
            raise ValueError("label_smoothing applies to loss_type='sigmoid' only")
        return F.relu(1.0 - u)
    if loss_type != "sigmoid":
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    losses = -F.logsigmoid(u)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-u)
    return losses


def preference_metrics(
    u: torch.Tensor,
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """TRL-named metrics of a pair batch (detached): accuracy, rewards and mean errors."""
    u = u.detach()
    d_w = policy_err_w.detach() - ref_err_w
    d_l = policy_err_l.detach() - ref_err_l
    return {
        "implicit_acc": (u > 0).float().mean() + 0.5 * (u == 0).float().mean(),
        "rewards/chosen": (-d_w).mean(),
        "rewards/rejected": (-d_l).mean(),
        "rewards/margins": (-(d_w - d_l)).mean(),
        "mse/policy_w": policy_err_w.detach().mean(),
        "mse/policy_l": policy_err_l.detach().mean(),
        "mse/ref_w": ref_err_w.mean(),
        "mse/ref_l": ref_err_l.mean(),
    }


def diffusion_dpo_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> LossOutput:
    """Diffusion-DPO (Wallace et al., arXiv 2311.12908): per-pair ``-log sigmoid(u)``.

    ``u = -(beta/2) * ((m_w - r_w) - (m_l - r_l))``; every input is ``[B]``, ``losses`` is ``[B]``.
    """
    u = preference_logit(policy_err_w - ref_err_w, policy_err_l - ref_err_l, beta)  # [B]
    losses = preference_loss(u, label_smoothing, loss_type)  # [B]
    metrics = preference_metrics(u, policy_err_w, policy_err_l, ref_err_w, ref_err_l)
    return LossOutput(losses, metrics)


def add_sft_term(output: LossOutput, policy_err_w: torch.Tensor, sft_weight: float) -> LossOutput:
    """Add the winner-SFT term ``sft_weight * m_w`` to each pair's loss (and ``loss/sft``)."""
    if sft_weight == 0:
        return output
    sft = sft_weight * policy_err_w  # [B]
    metrics = {**output.metrics, "loss/sft": sft.detach().mean()}
    return LossOutput(output.losses + sft, metrics)


def pair_objective(loss_fn, pairs: PairErrors, config, **settings) -> LossOutput:
    """The body the unweighted preference objectives share: ``loss_fn(m_w, m_l, r_w, r_l, beta,
    label_smoothing, loss_type, **settings)`` on the pair's errors, plus the winner-SFT term
    ``sft_weight * m_w``."""
    output = loss_fn(pairs.policy_err_w, pairs.policy_err_l, pairs.ref_err_w, pairs.ref_err_l,
                     beta=config.beta, label_smoothing=config.label_smoothing,
                     loss_type=config.loss_type, **settings)
    return add_sft_term(output, pairs.policy_err_w, config.sft_weight)


@register_objective(name="diffusion-dpo", config_cls=DiffusionDPOConfig)
def diffusion_dpo_objective(pairs: PairErrors, config: DiffusionDPOConfig) -> LossOutput:
    """Diffusion-DPO (Wallace et al. 2023): -log sigmoid(-(beta/2)(d_w - d_l))."""
    return pair_objective(diffusion_dpo_loss, pairs, config)
