"""The toy world's computable rewards (`sipo_plugin.toy.rewards`) as registered rewards.

They measure the decoded image (no model, no prompt): ``colour`` (vividness of the shape),
``geometry`` (a large, centred shape), ``size``, ``centred``; all in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch

from ..toy import rewards as toy_rewards
from .base import RewardError
from .registry import register_reward


class ToyReward:
    """fn(images, prompts) -> the toy reward ``name`` of the images as uint8 [N, H, W, 3]."""

    def __init__(self, name: str):
        self.name = name
        self.fn = toy_rewards.get_reward(name)

    def __call__(self, images, prompts) -> np.ndarray:
        arrays = [np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images]
        sizes = {a.shape for a in arrays}
        if len(sizes) > 1:
            raise RewardError(f"toy reward {self.name!r} needs images of one size, got "
                              f"{sorted(sizes)}")
        return self.fn(np.stack(arrays), list(prompts))


def _factory(name: str):
    def build(path: None, device: torch.device) -> ToyReward:
        return ToyReward(name)
    build.__module__ = __name__
    return build


for _name in toy_rewards.available_rewards():
    register_reward(name=_name, factory=_factory(_name),
                    description="toy world: " + (toy_rewards.get_reward(_name).__doc__ or
                                                 _name).strip().splitlines()[0])
