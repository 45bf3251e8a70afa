"""What a reward is, how clips are scored, and how several rewards combine.

A `Reward` wraps a scoring function ``fn(images: list[PIL.Image], prompts: list[str]) -> N
numbers`` (a tensor, array or list; higher is better) and gives every caller the same contract:
a float32 CPU tensor ``[N]``, checked for length and finiteness.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

ScoreFn = Callable[[list[Image.Image], list[str]], object]


class RewardError(ValueError):
    """A reward spec, model folder or score that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Reward:
    """A loaded reward. ``name`` keys its scores (e.g. in scores.jsonl); ``spec`` is the canonical
    spec it was built from (absolute model path), so a later run can tell it is the same model."""

    name: str
    spec: str
    fn: ScoreFn
    device: torch.device

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """Scores of (image, prompt) pairs: float32 ``[N]`` on the CPU, higher is better."""
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"reward {self.name!r}: {len(images)} images but {len(prompts)} prompts")
        if not images:
            return torch.zeros(0)
        with torch.no_grad():
            raw = self.fn(images, prompts)
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().float().cpu()
        scores = torch.as_tensor(np.asarray(raw, dtype=np.float32)).reshape(-1)
        if scores.shape[0] != len(images):
            raise RewardError(f"reward {self.name!r} returned {scores.shape[0]} scores for "
                              f"{len(images)} images; it must return one number per image")
        if not torch.isfinite(scores).all():
            raise RewardError(f"reward {self.name!r} returned a non-finite score "
                              f"({scores.tolist()}); check the reward model and its inputs")
        return scores

    def score_clips(self, clips: Sequence[Sequence[Image.Image]], prompts: Sequence[str],
                    every_k: int = 1, batch_size: int | None = None) -> torch.Tensor:
        """Clip scores ``[N]``: the mean image score over frames 0, k, 2k, ... of each clip.

            score(clip) = mean_{j = 0, k, 2k, ... < F} score(frame_j, prompt)

        Frames of all clips are scored together, ``batch_size`` images at a time (None: all).
        """
        if every_k < 1:
            raise ValueError(f"every_k (frame stride) must be >= 1, got {every_k}")
        if len(clips) != len(prompts):
            raise ValueError(f"reward {self.name!r}: {len(clips)} clips but {len(prompts)} prompts")
        frames, frame_prompts, owner = [], [], []
        for index, (clip, prompt) in enumerate(zip(clips, prompts)):
            picked = list(clip)[::every_k]
            if not picked:
                raise RewardError(f"reward {self.name!r}: clip {index} has no frames")
            frames += picked
            frame_prompts += [prompt] * len(picked)
            owner += [index] * len(picked)
        step = batch_size or max(1, len(frames))
        per_frame = torch.cat([self.score(frames[i:i + step], frame_prompts[i:i + step])
                               for i in range(0, len(frames), step)])
        owner_t = torch.tensor(owner)
        totals = torch.zeros(len(clips)).index_add_(0, owner_t, per_frame)
        counts = torch.zeros(len(clips)).index_add_(0, owner_t, torch.ones(len(frames)))
        return totals / counts


def zscores(values: torch.Tensor) -> torch.Tensor:
    """Per-candidate z-scores over the set: z_i = (s_i - mean(s)) / std(s), with the population
    std (divide by N); all zeros when std(s) = 0 (a reward that does not tell candidates apart)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    std = values.std(unbiased=False) if values.numel() > 1 else values.new_zeros(())
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(values)
    return (values - values.mean()) / std


def combine_scores(scores: Mapping[str, torch.Tensor],
                   weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """Weighted sum of per-reward z-scores over the candidate set (float64 ``[N]``):

        combined_i = sum_r  w_r * (s_{r,i} - mean_r) / std_r        (std: population, over N)

    ``scores``: reward name -> ``[N]`` raw scores of the same N candidates; ``weights``: reward
    name -> w_r (missing names: weight 1; names not in ``scores`` are an error). With one reward
    the combined score orders candidates exactly as the raw score does, in units of its std.
    """
    if not scores:
        raise ValueError("combine_scores: no rewards")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(scores))
    if unknown:
        raise ValueError(f"weights for rewards that were not scored: {', '.join(unknown)} "
                         f"(scored: {', '.join(sorted(scores))})")
    sizes = {name: torch.as_tensor(v).numel() for name, v in scores.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"rewards scored different numbers of candidates: {sizes}")
    total = torch.zeros(next(iter(sizes.values())), dtype=torch.float64)
    for name, values in scores.items():
        total += float(weights.get(name, 1.0)) * zscores(values)
    return total
