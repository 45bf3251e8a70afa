"""Per-pair augmentation decisions (caption dropout, horizontal flip) as pure functions of
(seed, epoch, pair index): a resumed or multi-process run makes the same decisions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class Draw(NamedTuple):
    """What a batch sampler hands the dataset for one pair: its index and the epoch drawing it."""

    index: int
    epoch: int


def draw_uniforms(seed: int, epoch: int, index: int) -> tuple[float, float]:
    """Two uniforms in [0, 1) from numpy's SeedSequence([seed mod 2^64, epoch, index]):
    the first decides caption dropout, the second the flip."""
    u = np.random.default_rng([seed % 2**64, epoch, index]).random(2)
    return float(u[0]), float(u[1])


@dataclass(frozen=True)
class PairAugmentation:
    """sd-scripts' ``caption_dropout_rate`` and ``flip_aug``, one decision per pair per epoch.

    The prompt becomes "" when u_caption < caption_dropout_rate; both images of the pair are
    mirrored when flip_aug and u_flip < 0.5 (one decision for the pair, so winner and loser stay
    comparable).
    """

    seed: int = 0
    caption_dropout_rate: float = 0.0
    flip_aug: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_dropout_rate <= 1.0:
            raise ValueError(
                f"caption_dropout_rate must be in [0, 1], got {self.caption_dropout_rate}")

    def decide(self, epoch: int, index: int) -> tuple[bool, bool]:
        """(drop the caption, flip both images) for pair `index` drawn in `epoch`."""
        if self.caption_dropout_rate == 0.0 and not self.flip_aug:
            return False, False
        u_caption, u_flip = draw_uniforms(self.seed, epoch, index)
        return u_caption < self.caption_dropout_rate, self.flip_aug and u_flip < 0.5
