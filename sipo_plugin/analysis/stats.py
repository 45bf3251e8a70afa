"""Per-timestep-bucket statistics of the analysis: pure functions over small tensors.

The schedule ``[0, N)`` (N = num_train_timesteps) is cut into ``n_buckets`` equal buckets; bucket
``b`` holds the timesteps ``t`` with ``floor(t * n_buckets / N) = b`` (``t = N``, possible for flow
models, falls into the last bucket).
"""

from __future__ import annotations

import math

import torch

from ..objectives.importance import pair_mask

__all__ = [
    "DISTRIBUTION_KEYS",
    "bucket_bounds",
    "bucket_index",
    "distribution",
    "masked_fraction",
    "pair_gradient_norm",
    "per_bucket",
    "stratified_timesteps",
]

DISTRIBUTION_KEYS = ("mean", "std", "min", "q05", "q25", "q50", "q75", "q95", "max")


def bucket_bounds(num_timesteps: int, n_buckets: int) -> list[tuple[int, int]]:
    """Inclusive integer bounds ``(lo, hi)`` of each bucket: 1000, 10 -> (0, 99) ... (900, 999).

    ``lo_b = ceil(b * N / n)``, ``hi_b = lo_{b+1} - 1``: exactly the integers with
    ``floor(t * n / N) = b``.
    """
    if n_buckets < 1 or num_timesteps < n_buckets:
        raise ValueError(f"need 1 <= n_buckets <= num_timesteps, got {n_buckets} buckets for "
                         f"{num_timesteps} timesteps")
    lows = [-(-b * num_timesteps // n_buckets) for b in range(n_buckets + 1)]
    return [(lows[b], lows[b + 1] - 1) for b in range(n_buckets)]


def bucket_index(timesteps: torch.Tensor, num_timesteps: int, n_buckets: int) -> torch.Tensor:
    """``floor(t * n_buckets / N)`` clamped to ``[0, n_buckets - 1]``, long ``[B]``."""
    t = torch.as_tensor(timesteps).reshape(-1).to(torch.float64)
    return torch.floor(t * n_buckets / num_timesteps).long().clamp(0, n_buckets - 1)


def stratified_timesteps(bucket: int, count: int, num_timesteps: int, n_buckets: int,
                         generator: torch.Generator, *, integer: bool = True) -> torch.Tensor:
    """``count`` timesteps drawn uniformly inside one bucket: long (DDPM) or float (flow, t = s*N).

    Integers: uniform over ``[lo_b, hi_b]``. Floats: uniform over ``[b N / n, (b + 1) N / n)``.
    """
    if not 0 <= bucket < n_buckets:
        raise ValueError(f"bucket must be in [0, {n_buckets - 1}], got {bucket}")
    if integer:
        lo, hi = bucket_bounds(num_timesteps, n_buckets)[bucket]
        return torch.randint(lo, hi + 1, (count,), generator=generator)
    width = num_timesteps / n_buckets
    return (bucket + torch.rand(count, generator=generator, dtype=torch.float64)) * width


def distribution(values: torch.Tensor) -> dict[str, float]:
    """Mean, std (population), min, 5/25/50/75/95 % quantiles, max of a tensor (NaN if empty)."""
    v = torch.as_tensor(values).detach().reshape(-1).to(torch.float64)
    if v.numel() == 0:
        return {key: math.nan for key in DISTRIBUTION_KEYS}
    q = torch.quantile(v, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    return {"mean": float(v.mean()), "std": float(v.std(unbiased=False)), "min": float(v.min()),
            **{k: float(x) for k, x in zip(("q05", "q25", "q50", "q75", "q95"), q, strict=True)},
            "max": float(v.max())}


def masked_fraction(weight_w: torch.Tensor, weight_l: torch.Tensor, threshold: float) -> float:
    """Share of pairs with ``min(w_w, w_l) < tau``: ``1 - mean(M)``, M as in the objectives."""
    if weight_w.numel() == 0:
        return math.nan
    return float(1.0 - pair_mask(weight_w, weight_l, threshold).mean())


def pair_gradient_norm(dloss_dmw: torch.Tensor, dloss_dml: torch.Tensor, sq_norm_w: torch.Tensor,
                       sq_norm_l: torch.Tensor, dot_wl: torch.Tensor) -> torch.Tensor:
    """``|| a g_w + b g_l ||`` per pair from ``a = dL/dm_w``, ``b = dL/dm_l``, ``|g_w|^2``,
    ``|g_l|^2`` and ``<g_w, g_l>`` (g = gradient of the per-sample error on the parameters).

    Exact when a pair's loss depends on the parameters only through its two errors ``m_w, m_l``
    (true of every built-in objective: weights and masks are stop-gradient):
    ``|a g_w + b g_l|^2 = a^2 |g_w|^2 + b^2 |g_l|^2 + 2ab <g_w, g_l>``. All tensors ``[B]``.
    """
    a, b = dloss_dmw.to(torch.float64), dloss_dml.to(torch.float64)
    sq = a * a * sq_norm_w.to(torch.float64) + b * b * sq_norm_l.to(torch.float64) \
        + 2 * a * b * dot_wl.to(torch.float64)
    return sq.clamp(min=0).sqrt()  # rounding can leave a tiny negative


def per_bucket(values: torch.Tensor, buckets: torch.Tensor, n_buckets: int) -> list[dict]:
    """:func:`distribution` of ``values[buckets == b]`` for every bucket ``b``."""
    values, buckets = torch.as_tensor(values).reshape(-1), torch.as_tensor(buckets).reshape(-1)
    if values.shape != buckets.shape:
        raise ValueError(f"values {tuple(values.shape)} and buckets {tuple(buckets.shape)} differ")
    return [distribution(values[buckets == b]) for b in range(n_buckets)]
