"""SFT on the winners: the plain diffusion MSE of the preferred samples (a baseline)."""

from __future__ import annotations

import torch

from .configs import SFTConfig
from .errors import LossOutput, PairErrors
from .registry import register_objective

__all__ = ["SFTConfig", "sft_loss"]


def sft_loss(policy_err_w: torch.Tensor, policy_err_l: torch.Tensor) -> LossOutput:
    """Winner-only supervised fine-tuning: per-pair ``m_w`` (the loser is ignored), ``[B]``.

    The standard denoising loss (Ho et al., arXiv 2006.11239, eq. 14) on the preferred samples.
    """
    metrics = {
        "mse/policy_w": policy_err_w.detach().mean(),
        "mse/policy_l": policy_err_l.detach().mean(),
    }
    return LossOutput(policy_err_w, metrics)


@register_objective(name="sft", config_cls=SFTConfig, needs_reference=False)
def sft_objective(pairs: PairErrors, config: SFTConfig) -> LossOutput:
    """SFT on winners: mean(m_w), the plain diffusion MSE of the preferred samples."""
    output = sft_loss(pairs.policy_err_w, pairs.policy_err_l)
    if pairs.ref_err_w is not None:  # the reference is not needed, but report it when given
        output.metrics["mse/ref_w"] = pairs.ref_err_w.mean()
        output.metrics["mse/ref_l"] = pairs.ref_err_l.mean()
    return output
