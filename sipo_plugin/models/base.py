"""The adapter interface every model family implements.

An adapter hides what differs between families: how weights load, how prompts and images are
encoded, how noise, timesteps and the training target are made, how the model predicts, and which
modules carry the LoRA that export/ writes. The training loop and the objectives never branch on
the family. What every family shares lives in three mixins: switching the LoRA (lora_switch.py),
the denoiser for full fine-tuning and the reference copy (denoiser.py), and where the frozen
encoders live (placement.py). Families register in registry.py; what config checks need to know
about a family without torch is in families.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from ..export.full_model import save_pipeline_atomic
from ..export.registry import lora_formats_of, write_lora
from .denoiser import DenoiserSwap
from .lora_switch import LoraSwitch
from .placement import EncoderPlacement
from .registry import (available_model_families, get_model_adapter,  # noqa: F401  (re-exported)
                       load_builtin_families, register_model_family)

# What the denoiser is conditioned on, by the keyword its forward takes (SD1.5:
# encoder_hidden_states; SDXL adds text_embeds and time_ids): every tensor has the batch on dim 0,
# so a cache can store it and `repeat_pair` can lay it out for winners and losers.
Conditioning = dict[str, torch.Tensor]
Generators = torch.Generator | list[torch.Generator]


@dataclass
class NoisyBatch:
    """One 2B batch ready for prediction: winners first, each pair sharing noise and timestep."""

    noisy: torch.Tensor  # [2B, *latent_shape]
    timesteps: torch.Tensor  # [2B], halves equal
    target: torch.Tensor  # [2B, *latent_shape], the parametrization's native target


def per_pair(generator: Generators, count: int) -> list[torch.Generator]:
    """One generator per pair: the given list, or the one shared stream ``count`` times."""
    if isinstance(generator, torch.Generator):
        return [generator] * count
    if len(generator) != count:
        raise ValueError(f"expected {count} generators (one per pair), got {len(generator)}")
    return list(generator)


def repeat_pair(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [2B, ...]: the same tensor for the winner and the loser of each pair."""
    return torch.cat([x, x], dim=0)


class ModelAdapter(LoraSwitch, DenoiserSwap, EncoderPlacement, ABC):
    """One model family: everything the trainer, sampling and export read on an adapter."""

    # -- what the family is (set by the family's class; ``family`` by register_model_family) --
    family: str = ""
    is_video: bool = False  # videos [N, 3, F, H, W] rather than images [N, 3, H, W]
    base_model_version: str = ""  # sd-scripts' ss_base_model_version ("sd_v1", "wan2.1", ...)
    modelspec_architecture: str = ""  # modelspec.architecture of exported LoRAs (".../lora")
    denoiser_name: str = "unet"  # the attribute holding the denoiser (video families: transformer)
    frozen_encoder_names: tuple[str, ...] = ("text_encoder", "text_encoder_2")

    # -- the parts every family has (and the denoiser, see ``denoiser``) --
    vae: torch.nn.Module
    text_encoder: torch.nn.Module  # the first (SDXL: of two; video: the frozen T5 / UMT5)
    tokenizer: object

    # -- state the trainer sets --
    device: torch.device  # where the denoiser runs
    noise_scheduler: object  # the diffusers training scheduler the objectives read
    finetune: str = "lora"  # "full" once unfreeze_denoiser ran
    # reference = "initial": the name of the frozen adapter holding the starting LoRA (the
    # reference then switches to it instead of switching the LoRA off); None: the base model
    reference_adapter: str | None = None
    first_timestep: int = 0  # the smallest timestep drawn (skip_masked_timesteps raises it)
    # several processes (training/distributed.py): the trained modules as accelerate prepared them
    # (what accumulate syncs), and FSDP / DeepSpeed's unsharded copies (meta) by attribute name
    prepared_modules: list | None = None
    unsharded_skeletons: dict | None = None

    @classmethod
    @abstractmethod
    def load(cls, model_cfg, *, device: torch.device, weight_dtype: torch.dtype = torch.float32
             ) -> "ModelAdapter":
        """The family's model from [model] settings (``pretrained_model_name_or_path`` and the
        family's own keys), frozen, on ``device``, in ``weight_dtype``."""

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: "epsilon", "v_prediction" or "flow" (metadata, errors)."""
        return self.noise_scheduler.config.prediction_type

    @property
    def lora_formats(self) -> tuple[str, ...]:
        """The [export] lora_format values written for this family (export/registry.py)."""
        return lora_formats_of(self.family)

    @property
    def trains_text_encoder(self) -> bool:
        return False

    # -- LoRA --

    @abstractmethod
    def add_lora(self, network) -> list[torch.nn.Parameter]:
        """Inject LoRA adapters (peft) and return the trainable parameters."""

    @abstractmethod
    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules holding trainable parameters (what accelerate prepares)."""

    @abstractmethod
    def lora_components(self) -> dict[str, torch.nn.Module]:
        """The modules carrying the trained LoRA, by the component name LoRA files use (unet,
        text_encoder, text_encoder_2, transformer): what export/'s writers read."""

    # -- encoding, noising, prediction --

    @abstractmethod
    def encode_images(self, pixel_values: torch.Tensor, generator: Generators) -> torch.Tensor:
        """[N, 3, ...] in [-1, 1] -> latents [N, ...]; ``generator``: one, or N (one per image)."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """B prompts -> conditioning tensors [B, ...] (with grad when the text encoder is trained)."""

    def pair_conditioning(self, cond: Conditioning, batch) -> Conditioning:
        """[B] prompt conditioning -> [2B] for winners then losers; families whose conditioning
        depends on each image (SDXL's size and crop ids) add it here from the `PairBatch`."""
        return {name: repeat_pair(value) for name, value in cond.items()}

    def draw_noise_and_timesteps(self, pair_latent_shape: torch.Size, generator: Generators
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """One noise tensor [B, ...] and one timestep [B] per pair.

        ``generator``: one stream for the batch, or a list of B, one per pair (the training loop
        seeds one per pair, so a pair's draw does not depend on how the batch is split).
        Default: uniform integer timesteps of the training scheduler (DDPM family), from
        ``first_timestep`` on.
        """
        num_steps = self.noise_scheduler.config.num_train_timesteps
        noise, timesteps = [], []
        for g in per_pair(generator, pair_latent_shape[0]):
            noise.append(torch.randn(pair_latent_shape[1:], generator=g, device=g.device))
            timesteps.append(torch.randint(self.first_timestep, num_steps, (), generator=g,
                                           device=g.device))
        return torch.stack(noise), torch.stack(timesteps)

    @abstractmethod
    def make_noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                   ) -> NoisyBatch:
        """Noisy input and native target of [2B] latents for [2B] noise and timesteps."""

    def noisy_inputs(self, latents: torch.Tensor, generator: Generators) -> NoisyBatch:
        """Draw noise and timestep once per pair, repeat them for winner and loser, noise."""
        noise, timesteps = self.draw_noise_and_timesteps(latents[: latents.shape[0] // 2].shape,
                                                         generator)
        return self.make_noisy(latents, repeat_pair(noise).to(latents.device, latents.dtype),
                               repeat_pair(timesteps).to(latents.device))

    @abstractmethod
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model's prediction in its native parametrization ([2B] conditioning)."""

    def input_dtype(self, module: torch.nn.Module) -> torch.dtype:
        """The dtype ``module``'s inputs are cast to (its ``.dtype``), read once per module:
        diffusers' ``ModelMixin.dtype`` walks every submodule (ms a call, twice a step). The memo
        is checked against the first parameter's dtype, so a module cast since is read again."""
        memo = self.__dict__.setdefault("_input_dtypes", {})
        first = next(module.parameters()).dtype
        hit = memo.get(id(module))
        if hit is None or hit[0] is not module or hit[1] != first:
            hit = memo[id(module)] = (module, first, module.dtype)
        return hit[2]

    # -- sampling and export --

    @abstractmethod
    def sampling_pipeline(self):
        """The trained model as its diffusers pipeline (the LoRA follows the adapter switch)."""

    def sampling_kwargs(self) -> dict:
        """Extra arguments of ``sampling_pipeline()(...)`` for sample images (e.g. video frames)."""
        return {}

    def network_metadata(self, config) -> dict[str, str]:
        """The family's extra ``ss_*`` keys of the exported file (SD: ss_clip_skip, LoCon/DoRA's
        ss_network_args)."""
        return {}

    def export_lora(self, path, *, lora_format: str, network_alpha: float | None, metadata: dict,
                    save_dtype: torch.dtype | None = None) -> Path:
        """Write the trained LoRA where users' tools load it: the (family, lora_format) writer of
        export/registry.py on ``lora_components()`` (weights in ``save_dtype``; None: as
        trained)."""
        return write_lora(self.family, lora_format, path, self.lora_components(),
                          network_alpha=network_alpha, metadata=metadata, save_dtype=save_dtype)

    def export_full(self, path, *, metadata: dict, save_dtype: torch.dtype | None = None) -> Path:
        """Full fine-tuning: the whole pipeline as a diffusers folder (safetensors), written
        atomically; ``from_pretrained(path)`` loads it, diffusers' conversion scripts turn it into
        a single-file checkpoint for WebUI / ComfyUI."""
        return save_pipeline_atomic(self.sampling_pipeline(), path, metadata=metadata,
                                    save_dtype={self.denoiser_name: save_dtype})
