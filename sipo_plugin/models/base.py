"""The adapter interface every model family implements, and the registry mapping names to adapters.

An adapter hides what differs between families: how weights load, how prompts and images are
encoded, how noise, timesteps and the training target are made, how the model predicts, and how the
LoRA is named for export. The training loop and the objectives never branch on the family.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

_FAMILIES: dict[str, type["ModelAdapter"]] = {}

# What the denoiser is conditioned on, by the keyword its forward takes (SD1.5:
# encoder_hidden_states; SDXL adds text_embeds and time_ids): every tensor has the batch on dim 0,
# so a cache can store it and `repeat_pair` can lay it out for winners and losers.
Conditioning = dict[str, torch.Tensor]


@dataclass
class NoisyBatch:
    """One 2B batch ready for prediction: winners first, each pair sharing noise and timestep."""

    noisy: torch.Tensor  # [2B, *latent_shape]
    timesteps: torch.Tensor  # [2B], halves equal
    target: torch.Tensor  # [2B, *latent_shape], the parametrization's native target


def register_model_family(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in _FAMILIES:
            raise ValueError(f"model family '{name}' is already registered")
        cls.family = name
        _FAMILIES[name] = cls
        return cls
    return wrap


def available_model_families() -> list[str]:
    return sorted(_FAMILIES)


def get_model_adapter(name: str) -> type["ModelAdapter"]:
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family '{name}'; available: {', '.join(available_model_families())}")
    return _FAMILIES[name]


def repeat_pair(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [2B, ...]: the same tensor for the winner and the loser of each pair."""
    return torch.cat([x, x], dim=0)


class ModelAdapter(ABC):
    family: str = ""
    noise_scheduler: object  # the diffusers training scheduler the objectives read

    @abstractmethod
    def add_lora(self, network) -> list[torch.nn.Parameter]:
        """Inject LoRA adapters (peft) and return the trainable parameters."""

    @abstractmethod
    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules holding trainable parameters (what accelerate prepares)."""

    @abstractmethod
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> latents [N, ...]."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """B prompts -> conditioning tensors [B, ...] (with grad when the text encoder is trained)."""

    def pair_conditioning(self, cond: Conditioning, batch: dict) -> Conditioning:
        """[B] prompt conditioning -> [2B] for winners then losers; families whose conditioning
        depends on each image (SDXL's size and crop ids) add it here from the batch."""
        return {name: repeat_pair(value) for name, value in cond.items()}

    def draw_noise_and_timesteps(self, pair_latent_shape: torch.Size, generator: torch.Generator
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """One noise tensor [B, ...] and one timestep [B] per pair, from ``generator``'s stream.

        Default: uniform integer timesteps of the training scheduler (DDPM family).
        """
        noise = torch.randn(pair_latent_shape, generator=generator, device=generator.device)
        num_steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_steps, (pair_latent_shape[0],), generator=generator,
                                  device=generator.device)
        return noise, timesteps

    @abstractmethod
    def make_noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                   ) -> NoisyBatch:
        """Noisy input and native target of [2B] latents for [2B] noise and timesteps."""

    def noisy_inputs(self, latents: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        """Draw noise and timestep once per pair, repeat them for winner and loser, noise."""
        noise, timesteps = self.draw_noise_and_timesteps(latents[: latents.shape[0] // 2].shape,
                                                         generator)
        return self.make_noisy(latents, repeat_pair(noise).to(latents.device, latents.dtype),
                               repeat_pair(timesteps).to(latents.device))

    @abstractmethod
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model's prediction in its native parametrization ([2B] conditioning)."""

    @abstractmethod
    def set_adapters_enabled(self, enabled: bool) -> None:
        """Switch the LoRA on or off in every module that carries one."""

    @property
    def trains_text_encoder(self) -> bool:
        return False

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The reference model is the same weights with the adapter disabled: no second copy."""
        self.set_adapters_enabled(False)
        try:
            yield
        finally:
            self.set_adapters_enabled(True)

    @abstractmethod
    def export_lora(self, path, *, lora_format: str, network_alpha: float, metadata: dict) -> object:
        """Write the trained LoRA where users' tools load it."""
