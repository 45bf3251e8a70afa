"""The batch contract: B preference pairs laid out as 2B samples, winners first (Diffusion-DPO
layout; `split_pair` splits it). Every loader of the package yields a `PairBatch`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PairBatch:
    """One micro-batch of B pairs.

    The images come as ``pixel_values`` (decoded: the VAE encodes them) or ``latents`` (cached,
    or the sampler's saved latents; a batch may carry both, and the latents win); the prompts as
    ``prompts`` (the text encoders encode them) or ``cond`` (their cached outputs). ``extras``
    are the per-image conditioning tensors of some families in the 2B layout (SDXL's
    ``original_sizes``, ``crop_top_lefts``, ``target_sizes``: [2B, 2] int64). A cached reference
    adds each pair's ``reference_errors`` and the ``reference_draw`` they were computed for.
    """

    weights: torch.Tensor  # [B] float32: each pair's weight in the loss
    indices: torch.Tensor  # [B] int64: each pair's identity (its draws are seeded from it)
    pixel_values: torch.Tensor | None = None  # [2B, 3, H, W] or [2B, 3, F, H, W] in [-1, 1]
    latents: torch.Tensor | None = None  # [2B, ...]
    prompts: list[str] | None = None  # [B], shared by a pair's winner and loser
    cond: dict[str, torch.Tensor] | None = None  # the adapter's Conditioning, [B, ...]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # [2B, ...] each
    reference_errors: torch.Tensor | None = None  # [2B] cached reference errors
    reference_draw: torch.Tensor | None = None  # [B] int64: the cached draw k of each pair

    @property
    def num_pairs(self) -> int:
        return self.indices.shape[0]

    def to(self, device, non_blocking: bool = False) -> "PairBatch":
        """The model's inputs on ``device`` (accelerate's prepared loader calls this). weights,
        indices and reference_draw stay on the CPU: the host reads them (seeds, the weights-are-1
        check) and would otherwise wait for the device to copy them back."""

        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device, non_blocking=non_blocking)

        return dataclasses.replace(
            self, pixel_values=move(self.pixel_values), latents=move(self.latents),
            cond=None if self.cond is None else {k: move(v) for k, v in self.cond.items()},
            extras={k: move(v) for k, v in self.extras.items()},
            reference_errors=move(self.reference_errors))
