"""Full fine-tuning and the frozen reference copy: what every family does with its denoiser (the
module named by ``denoiser_name``: SD's unet, the video families' transformer)."""

from __future__ import annotations

import contextlib
from copy import deepcopy
from typing import Iterator

import torch


class DenoiserSwap:
    """Mixin of ModelAdapter: needs ``denoiser_name``, ``finetune`` and ``add_lora(network)``."""

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    def add_trainable(self, network) -> list[torch.nn.Parameter]:
        """What trains: a LoRA (``network.finetune = "lora"``) or every denoiser weight ("full")."""
        self.forget_lora_layers()
        if network.finetune == "full":
            return self.unfreeze_denoiser()
        return self.add_lora(network)

    def unfreeze_denoiser(self) -> list[torch.nn.Parameter]:
        """Full fine-tuning: every denoiser weight trains, kept in fp32 (mixed precision autocasts
        the forward); the text encoders stay frozen."""
        self.finetune = "full"
        denoiser = self.denoiser
        if denoiser.dtype != torch.float32:
            denoiser.to(torch.float32)
        denoiser.requires_grad_(True)
        return list(denoiser.parameters())

    def frozen_denoiser_copy(self, device: torch.device | str | None = None,
                             dtype: torch.dtype | None = None) -> torch.nn.Module:
        """A frozen deep copy of the denoiser as it is now (before any adapter or training)."""
        copy = deepcopy(self.denoiser).requires_grad_(False).eval()
        if device is not None:
            copy.to(device)
        if dtype is not None and dtype != copy.dtype:
            copy.to(dtype)
        return copy

    @contextlib.contextmanager
    def swapped_denoiser(self, module: torch.nn.Module) -> Iterator[None]:
        """``predict`` runs ``module`` instead of the trained denoiser (a frozen reference copy)."""
        trained = self.denoiser
        setattr(self, self.denoiser_name, module)
        try:
            yield
        finally:
            setattr(self, self.denoiser_name, trained)
