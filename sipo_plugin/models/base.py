"""The adapter interface every model family implements, and the registry mapping names to adapters.

An adapter hides what differs between families: how weights load, how prompts and images are
encoded, how noise, timesteps and the training target are made, how the model predicts, and how the
LoRA is named for export. The training loop and the objectives never branch on the family.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
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


def load_builtin_families() -> None:
    """Import the built-in adapters (each registers itself); they import diffusers, so the package
    loads them on first use rather than at import."""
    import importlib
    from .families import FAMILIES
    for name in FAMILIES:
        importlib.import_module(f"{__package__}.{name}")


def available_model_families() -> list[str]:
    load_builtin_families()
    return sorted(_FAMILIES)


def get_model_adapter(name: str) -> type["ModelAdapter"]:
    load_builtin_families()
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family '{name}'; available: {', '.join(available_model_families())}")
    return _FAMILIES[name]


Generators = torch.Generator | list[torch.Generator]


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


class ModelAdapter(ABC):
    family: str = ""
    noise_scheduler: object  # the diffusers training scheduler the objectives read
    denoiser_name: str = "unet"  # the attribute holding the denoiser (video families: transformer)
    frozen_encoder_names: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    finetune: str = "lora"  # "full" once unfreeze_denoiser ran
    # reference = "initial": the name of the frozen adapter holding the starting LoRA (the
    # reference then switches to it instead of switching the LoRA off); None: the base model
    reference_adapter: str | None = None
    first_timestep: int = 0  # the smallest timestep drawn (skip_masked_timesteps raises it)

    @abstractmethod
    def add_lora(self, network) -> list[torch.nn.Parameter]:
        """Inject LoRA adapters (peft) and return the trainable parameters."""

    @abstractmethod
    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules holding trainable parameters (what accelerate prepares)."""

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

    def noisy_inputs(self, latents: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
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

    def set_adapters_enabled(self, enabled: bool) -> None:
        """Switch the LoRA on or off in every trainable module (peft's ``enable_adapters`` on each
        LoRA layer; off: the base weights alone), on the layers found once per module (finding
        them walks every submodule: ms on a large denoiser, twice a step)."""
        for module in self.trainable_modules():
            for layer in self.lora_layers(module):
                layer.enable_adapters(enabled)

    def lora_layers(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        """The peft tuner layers inside ``module``, found on first use (memo per module)."""
        from .peft_lora import lora_layers
        memo = self.__dict__.setdefault("_lora_layers", {})
        hit = memo.get(id(module))
        if hit is None or hit[0] is not module:
            hit = memo[id(module)] = (module, lora_layers(module))
        return hit[1]

    @property
    def trains_text_encoder(self) -> bool:
        return False

    def sampling_kwargs(self) -> dict:
        """Extra arguments of ``sampling_pipeline()(...)`` for sample images (e.g. video frames)."""
        return {}

    def set_active_adapter(self, name: str) -> None:
        """Make adapter ``name`` the active one (only the trained adapter requires grad)."""
        raise NotImplementedError(f"{type(self).__name__} has one adapter only")

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The reference model is the same weights with the adapter disabled (no second copy), or,
        with ``reference_adapter``, with that frozen adapter active instead of the trained one."""
        if self.finetune == "full":
            raise RuntimeError("full fine-tuning has no adapter to switch off: the reference is a "
                               "frozen copy or cached errors (sipo_plugin.training.reference)")
        if self.reference_adapter:
            from .peft_lora import TRAINED_ADAPTER
            self.set_active_adapter(self.reference_adapter)
            try:
                yield
            finally:
                self.set_active_adapter(TRAINED_ADAPTER)
            return
        self.set_adapters_enabled(False)
        try:
            yield
        finally:
            self.set_adapters_enabled(True)

    @abstractmethod
    def export_lora(self, path, *, lora_format: str, network_alpha: float, metadata: dict,
                    save_dtype: torch.dtype | None = None) -> object:
        """Write the trained LoRA where users' tools load it (weights in ``save_dtype``; None: as
        trained)."""

    def network_metadata(self, config) -> dict[str, str]:
        """The family's extra ``ss_*`` keys of the exported file (SD: ss_clip_skip, LoCon/DoRA's
        ss_network_args)."""
        return {}

    # -- full fine-tuning and the reference model (generic: every family names its denoiser) --

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    def add_trainable(self, network) -> list[torch.nn.Parameter]:
        """What trains: a LoRA (``network.finetune = "lora"``) or every denoiser weight ("full")."""
        self.__dict__.pop("_lora_layers", None)  # new peft layers: find them again
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

    def release_encoders(self, *, vae: bool, text_encoders: bool) -> list[str]:
        """Move the VAE and/or the frozen text encoders to the CPU once their outputs are cached
        (they stay usable for sampling, see ``encoders_on_device``, and export); returns their
        names."""
        names = (["vae"] if vae else []) + (
            [n for n in self.frozen_encoder_names if getattr(self, n, None) is not None]
            if text_encoders else [])
        # weights already on the CPU (a CPU run, diffusers group offloading) stay where they are
        self.released_encoders = [n for n in names
                                  if next(getattr(self, n).parameters()).device.type != "cpu"]
        for name in self.released_encoders:
            getattr(self, name).to("cpu")
        return names

    def restore_encoders(self) -> None:
        """Released encoders back on the training device (after training: export, evaluation)."""
        for name in getattr(self, "released_encoders", []):
            getattr(self, name).to(self.device)
        self.released_encoders = []

    @contextlib.contextmanager
    def encoders_on_device(self) -> Iterator[None]:
        """Released encoders back on the training device for a while (sampling images mid-run)."""
        names = getattr(self, "released_encoders", [])
        self.restore_encoders()
        try:
            yield
        finally:
            self.released_encoders = names
            for name in names:
                getattr(self, name).to("cpu")

    def export_full(self, path, *, metadata: dict, save_dtype: torch.dtype | None = None) -> Path:
        """Full fine-tuning: the whole pipeline as a diffusers folder (safetensors), written
        atomically; ``from_pretrained(path)`` loads it, diffusers' conversion scripts turn it into
        a single-file checkpoint for WebUI / ComfyUI."""
        from ..export.full_model import save_pipeline_atomic
        return save_pipeline_atomic(self.sampling_pipeline(), path, metadata=metadata,
                                    save_dtype={self.denoiser_name: save_dtype})
