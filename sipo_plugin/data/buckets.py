"""Aspect-ratio buckets (sd-scripts semantics: ``enable_bucket``, ``min_bucket_reso``,
``max_bucket_reso``, ``bucket_reso_steps``).

A bucket resolution ``reso`` is (width, height) as in sd-scripts; the dataset works in (h, w).
Buckets hold about resolution^2 pixels and their sides are multiples of ``bucket_reso_steps``.
A pair goes to one bucket chosen from both images: the bucket whose aspect ratio (w / h) is
closest to the geometric mean of the two images' aspect ratios, sqrt(ar_winner * ar_loser), which
does not depend on which image won. Each image is then resized to cover the bucket and
center-cropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketSpec:
    """The bucket settings of a run (sd-scripts names and defaults)."""

    resolution: int
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64

    def problem(self) -> str | None:
        """Why these settings make no buckets, or None when they are fine."""
        steps, lo, hi = self.bucket_reso_steps, self.min_bucket_reso, self.max_bucket_reso
        if steps <= 0:
            return f"bucket_reso_steps must be > 0, got {steps}"
        if lo <= 0 or lo % steps or hi % steps:
            return (f"min_bucket_reso ({lo}) and max_bucket_reso ({hi}) must be positive "
                    f"multiples of bucket_reso_steps ({steps})")
        if not lo <= self.resolution <= hi:
            return (f"resolution ({self.resolution}) must lie between min_bucket_reso ({lo}) "
                    f"and max_bucket_reso ({hi})")
        return None

    def resolutions(self) -> list[tuple[int, int]]:
        """Sorted (w, h) buckets: see `bucket_resolutions`."""
        return bucket_resolutions(self.resolution, self.min_bucket_reso, self.max_bucket_reso,
                                  self.bucket_reso_steps)


def bucket_resolutions(resolution: int, min_reso: int, max_reso: int,
                       steps: int) -> list[tuple[int, int]]:
    """sd-scripts' bucket list for a square ``resolution`` (area A = resolution^2), as (w, h):

    the square (s, s) with s = floor(resolution / steps) * steps, and for each width
    w = min_reso, min_reso + steps, ... <= max_reso: h = min(max_reso, floor((A // w) / steps) *
    steps), kept (with its transpose (h, w)) when h >= min_reso. Sorted by (w, h).
    """
    area = resolution * resolution
    side = (resolution // steps) * steps
    resos = {(side, side)}
    for w in range(min_reso, max_reso + 1, steps):
        h = min(max_reso, ((area // w) // steps) * steps)
        if h >= min_reso:
            resos.update({(w, h), (h, w)})
    return sorted(resos)


def select_bucket(resos: Sequence[tuple[int, int]], aspect: float) -> tuple[int, int]:
    """The (w, h) bucket whose aspect ratio w / h is closest to `aspect` (first one on a tie)."""
    errors = [abs(w / h - aspect) for w, h in resos]
    return resos[errors.index(min(errors))]


def pair_aspect(size_a: tuple[int, int], size_b: tuple[int, int]) -> float:
    """sqrt(ar_a * ar_b) with ar = w / h for (w, h) sizes: the pair's aspect ratio."""
    (wa, ha), (wb, hb) = size_a, size_b
    return math.sqrt((wa / ha) * (wb / hb))


def pair_bucket_hw(resos: Sequence[tuple[int, int]], size_chosen: tuple[int, int],
                   size_rejected: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) training size of a pair whose images are (w, h) `size_chosen`, `size_rejected`."""
    w, h = select_bucket(resos, pair_aspect(size_chosen, size_rejected))
    return h, w
