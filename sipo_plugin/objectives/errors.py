"""Per-sample errors of a ``[winners; losers]`` batch and the containers the losses exchange.

Layout (the Diffusion-DPO convention): a batch of B preference pairs is 2B samples, the B winners
first, then the B losers; winner ``i`` and loser ``i`` share the prompt, the noise and the timestep.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

__all__ = ["LossOutput", "PairErrors", "drop_empty_groups", "per_sample_error", "split_pair",
           "pair_timesteps"]

# a per-group metric: "<name>_by_<group>/<group value>", e.g. weights_by_t/000-099
_GROUP_METRIC = re.compile(r"[^/]*_by_[^/]*/.+")


class LossOutput(NamedTuple):
    """What a pure loss function returns: per-pair losses ``[B]`` (not reduced) and metrics.

    ``metrics`` maps TRL-style names to detached 0-dim tensors or floats; the objective converts
    them to floats once, after the reduction. A per-group metric (``<name>_by_<group>/<value>``,
    e.g. ``weights_by_t/000-099``) is NaN when no pair of the batch is in the group, so it is
    made without reading the batch on the host: the trainer's logger leaves non-finite values
    out of the interval mean, and ``from_errors`` leaves such keys out (:func:`drop_empty_groups`).
    """

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor | float]


@dataclass(frozen=True)
class PairErrors:
    """Per-pair inputs of an objective function: every tensor is ``[B]``.

    ``policy_err_*`` are fp32 with grad (through the policy prediction only), ``ref_err_*`` are fp32
    without grad (None for an objective registered with ``needs_reference=False``), ``timesteps`` holds the pair's shared timestep, ``scheduler`` is the diffusers
    scheduler the timesteps come from (for the step-wise importance weight).
    """

    policy_err_w: torch.Tensor
    policy_err_l: torch.Tensor
    ref_err_w: torch.Tensor | None
    ref_err_l: torch.Tensor | None
    timesteps: torch.Tensor
    scheduler: Any


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dim of ``(pred - target)^2`` in fp32: ``[N, ...] -> [N]``."""
    if pred.shape != target.shape:
        shapes = f"{tuple(pred.shape)} vs {tuple(target.shape)}"
        raise ValueError(f"pred and target shapes differ: {shapes}")
    if pred.ndim == 0:
        raise ValueError("pred must have a batch dimension, got a 0-dim tensor")
    diff = pred.float() - target.float()  # [N, ...] fp32
    return diff.square().reshape(diff.shape[0], -1).mean(dim=1)  # [N]


def split_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a ``[2B, ...]`` winners-first batch into ``(x_w, x_l)``, each ``[B, ...]``."""
    if x.ndim == 0 or x.shape[0] % 2 != 0:
        size = "a 0-dim tensor" if x.ndim == 0 else f"batch size {x.shape[0]}"
        raise ValueError(
            f"expected a [2B, ...] batch laid out as [winners; losers], got {size}: "
            "the batch size must be even"
        )
    x_w, x_l = x.chunk(2, dim=0)
    return x_w, x_l


def pair_timesteps(timesteps: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """The ``[B]`` per-pair timesteps from ``[B]`` or ``[2B]`` timesteps (equal halves)."""
    t = torch.as_tensor(timesteps).reshape(-1)
    if t.numel() == num_pairs:
        return t
    if t.numel() == 2 * num_pairs:
        t_w, t_l = t.chunk(2)
        if not torch.equal(t_w, t_l):
            raise ValueError(
                "timesteps of shape [2B] must repeat the same [B] timesteps for winners and "
                "losers (a pair shares its timestep)"
            )
        return t_w
    raise ValueError(
        f"timesteps must have B={num_pairs} or 2B={2 * num_pairs} elements, got {t.numel()}"
    )


def drop_empty_groups(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics without the per-group ones that are NaN (no pair in the group)."""
    return {k: v for k, v in metrics.items()
            if not (_GROUP_METRIC.fullmatch(k) and isinstance(v, float) and math.isnan(v))}
