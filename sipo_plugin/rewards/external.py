"""``hpsv2`` and ``imagereward``: rewards from their own packages, when those packages import.

Both packages download their weights at run time (from the Hugging Face hub) unless given a local
checkpoint, load them by their own means (which may unpickle), and pick preprocessing of their
own; this project only calls their public scoring functions:

    hpsv2        hpsv2.score(images, prompt, cp=PATH or None, hps_version="v2.1")
    imagereward  ImageReward.load(PATH or "ImageReward-v1.0", device=...).score(prompt, images)
"""

from __future__ import annotations

import importlib
from collections import defaultdict

import torch

from .base import RewardError
from .registry import PATH_OPTIONAL, register_reward


def import_optional(module: str, reward: str, install: str):
    """``module`` imported, or RewardError: one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - an import that fails for any reason is "not usable"
        raise RewardError(f"reward {reward!r} needs the {install!r} package, which does not import "
                          f"here ({type(err).__name__}: {err}); `pip install {install}` or pick "
                          f"another reward (--list-rewards)") from None


def by_prompt(prompts) -> dict[str, list[int]]:
    """Prompt -> indices of the items with that prompt (the packages score one prompt a call)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        groups[prompt].append(index)
    return groups


class HPSv2:
    def __init__(self, path: str | None, device: torch.device):
        self.hpsv2 = import_optional("hpsv2", "hpsv2", "hpsv2")
        self.checkpoint = path

    def __call__(self, images, prompts) -> torch.Tensor:
        out = torch.zeros(len(images))
        for prompt, indices in by_prompt(prompts).items():
            scores = self.hpsv2.score([images[i] for i in indices], prompt, cp=self.checkpoint,
                                      hps_version="v2.1")
            out[indices] = torch.as_tensor([float(s) for s in scores])
        return out


class ImageRewardModel:
    def __init__(self, path: str | None, device: torch.device):
        package = import_optional("ImageReward", "imagereward", "image-reward")
        self.model = package.load(path or "ImageReward-v1.0", device=str(device))

    def __call__(self, images, prompts) -> torch.Tensor:
        out = torch.zeros(len(images))
        for prompt, indices in by_prompt(prompts).items():
            scores = self.model.score(prompt, [images[i] for i in indices])
            scores = scores if isinstance(scores, (list, tuple)) else [scores]
            out[indices] = torch.as_tensor([float(s) for s in scores])
        return out


register_reward(name="hpsv2", factory=HPSv2, path=PATH_OPTIONAL,
                description="HPSv2.1 (needs `pip install hpsv2`; downloads its weights unless "
                            "given a checkpoint)",
                path_help="a local HPS_v2.1_compressed.pt")
register_reward(name="imagereward", factory=ImageRewardModel, path=PATH_OPTIONAL,
                description="ImageReward v1.0 (needs `pip install image-reward`; downloads its "
                            "weights unless given a checkpoint)",
                path_help="a local ImageReward.pt")
