"""Stable Diffusion 1.x architecture (UNet2DConditionModel + AutoencoderKL + CLIP text encoder).

The bundled toy model is one; so is any SD1.5 fine-tune in diffusers format or as a single-file
checkpoint (loaded through diffusers: with a local config folder, `model_config`, nothing is
downloaded; without one diffusers fetches its base model's configs).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTokenizer

from ..export.lora_file import network_weights_file
from .base import Conditioning, Generators, ModelAdapter, NoisyBatch, register_model_family
from .families import FAMILIES, named_model
from .lora_start import fresh_lora_config, inject_from_file
from .peft_lora import TRAINED_ADAPTER, inject_lora, lora_config, set_active_lora
from .single_file import SINGLE_FILE_SUFFIXES, load_single_file


def resolve_model_path(name_or_path: str) -> Path:
    """A registered model name (`families.named_model`, e.g. the toy world's 'toy') is its folder;
    anything else is a local path."""
    named = named_model(name_or_path)
    return named.folder if named is not None else Path(name_or_path)


def load_pipeline_components(name_or_path: str, model_config: str, *, pipeline_cls,
                             parts: dict[str, type], architecture: str,
                             single_file_kwargs: dict | None = None) -> dict:
    """`parts` ({subfolder: class}) of a local diffusers folder, or of a single-file checkpoint
    (`single_file.load_single_file`: the configs of `model_config`, or without it those diffusers
    fetches), plus a DDPM training scheduler ("scheduler"). `architecture` names the expected
    model in errors."""
    path = resolve_model_path(name_or_path)
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        pipe = load_single_file(path, model_config, pipeline_cls=pipeline_cls, parts=list(parts),
                                architecture=architecture, **(single_file_kwargs or {}))
        components = {name: getattr(pipe, name) for name in parts}
        components["scheduler"] = DDPMScheduler.from_config(pipe.scheduler.config)
        return components
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{path}: not a diffusers model folder (no model_index.json); give a diffusers "
                         "folder, or a .safetensors checkpoint with model_config")
    components = {name: cls.from_pretrained(path, subfolder=name) for name, cls in parts.items()}
    components["scheduler"] = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    return components


def load_sd15_components(name_or_path: str, model_config: str = "") -> dict:
    """Load tokenizer, text encoder, VAE, U-Net and a DDPM training scheduler, all local."""
    return load_pipeline_components(
        name_or_path, model_config, pipeline_cls=StableDiffusionPipeline, architecture="SD1.x",
        parts={"tokenizer": CLIPTokenizer, "text_encoder": CLIPTextModel, "vae": AutoencoderKL,
               "unet": UNet2DConditionModel},
        single_file_kwargs={"safety_checker": None, "requires_safety_checker": False})


def check_clip_skip(clip_skip: int, text_encoder) -> None:
    """1 <= clip_skip <= the encoder's layer count, else a one-line ValueError."""
    layers = text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip = {clip_skip}: the text encoder has {layers} layers "
                         f"(use 1 to {layers}; 2 is the penultimate)")


@register_model_family("sd15")
class SD15Adapter(ModelAdapter):
    """SD1.x: epsilon or v-prediction U-Net on VAE latents, CLIP text conditioning."""

    base_model_version = FAMILIES["sd15"].base_model_version
    modelspec_architecture = "stable-diffusion-v1/lora"
    text_encoder_names: tuple[str, ...] = ("text_encoder",)  # each gets the LoRA when trained
    load_components = staticmethod(load_sd15_components)  # (name_or_path, model_config) -> dict

    default_clip_skip = 1  # the last layer (sd-scripts numbering)

    def __init__(self, components: dict, *, device: torch.device, weight_dtype: torch.dtype,
                 clip_skip: int = 0):
        self.clip_skip = clip_skip or self.default_clip_skip
        self.tokenizer = components["tokenizer"]
        self.text_encoder = components["text_encoder"]
        self.vae = components["vae"]
        self.unet = components["unet"]
        self.noise_scheduler = components["scheduler"]
        self.device = device
        self._train_text_encoder = False
        for module in (self.text_encoder, self.vae, self.unet):
            module.requires_grad_(False)
            module.to(device)
        if weight_dtype != torch.float32:  # the VAE stays fp32: SD1.5's VAE overflows in fp16
            self.text_encoder.to(dtype=weight_dtype)
            self.unet.to(dtype=weight_dtype)
        check_clip_skip(self.clip_skip, self.text_encoder)
        if not hasattr(self.text_encoder, "text_model"):
            # diffusers' SD encode_prompt(clip_skip=...) reads text_encoder.text_model.final_layer_norm,
            # a level transformers 5 removed: a plain (unregistered) alias keeps sampling working
            self.text_encoder.__dict__["text_model"] = SimpleNamespace(
                final_layer_norm=self.text_encoder.final_layer_norm)

    @classmethod
    def load(cls, model_cfg, *, device: torch.device, weight_dtype: torch.dtype = torch.float32):
        components = cls.load_components(model_cfg.pretrained_model_name_or_path,
                                         model_cfg.model_config)
        return cls(components, device=device, weight_dtype=weight_dtype,
                   clip_skip=getattr(model_cfg, "clip_skip", 0))

    @property
    def trains_text_encoder(self) -> bool:
        return self._train_text_encoder

    def kohya_unet_namer(self):
        """U-Net module path -> the name sd-scripts files use (None: the path itself)."""
        return None

    def add_lora(self, network) -> list[torch.nn.Parameter]:
        """A fresh LoRA (LoCon with conv_dim, DoRA with use_dora), or the LoRA of network_weights
        (plus its frozen copy as the reference adapter when ``reference_adapter`` is set)."""
        if network.network_weights:
            models = {"unet": self.unet, **{n: getattr(self, n) for n in self.text_encoder_names}}
            adapters = (TRAINED_ADAPTER, *([self.reference_adapter] if self.reference_adapter else []))
            found = inject_from_file(models, network_weights_file(network.network_weights),
                                     family=self.family, use_dora=network.use_dora,
                                     adapters=adapters, unet_namer=self.kohya_unet_namer())
            self._train_text_encoder = any(c != "unet" for c in found)
        else:
            inject_lora(self.unet, fresh_lora_config(network, self.unet))
            if network.train_text_encoder:  # LoRA on every text encoder, with the same settings
                for name in self.text_encoder_names:
                    inject_lora(getattr(self, name), lora_config(
                        rank=network.network_dim, alpha=network.network_alpha,
                        targets=network.text_encoder_target_modules, use_dora=network.use_dora))
                self._train_text_encoder = True
        params = [p for m in self.trainable_modules() for p in m.parameters() if p.requires_grad]
        for p in params:  # LoRA weights train in fp32 even when the base is fp16/bf16
            p.data = p.data.float()
        return params

    def trainable_modules(self) -> list[torch.nn.Module]:
        if not self._train_text_encoder:
            return [self.unet]
        return [self.unet, *(getattr(self, name) for name in self.text_encoder_names)]

    def set_active_adapter(self, name: str) -> None:
        for module in self.trainable_modules():
            set_active_lora(module, name, trainable=name == TRAINED_ADAPTER)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: Generators) -> torch.Tensor:
        latent_dist = self.vae.encode(pixel_values.to(self.device, torch.float32)).latent_dist
        return latent_dist.sample(generator=generator) * self.vae.config.scaling_factor

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """CLIP hidden state -clip_skip, through the final layer norm (sd-scripts and diffusers'
        encode_prompt(clip_skip=clip_skip - 1); clip_skip 1 is the last layer's output)."""
        ids = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.tokenizer.model_max_length).input_ids
        if self.clip_skip == 1:
            return {"encoder_hidden_states": self.text_encoder(ids.to(self.device))[0]}
        out = self.text_encoder(ids.to(self.device), output_hidden_states=True)
        hidden = out.hidden_states[-self.clip_skip]
        return {"encoder_hidden_states": self.text_encoder.final_layer_norm(hidden)}

    def sampling_kwargs(self) -> dict:
        """diffusers counts skipped layers: its clip_skip is ours minus the default."""
        skip = self.clip_skip - self.default_clip_skip
        return {"clip_skip": skip} if skip else {}

    def network_metadata(self, config) -> dict[str, str]:
        """ss_clip_skip; LoCon / DoRA settings in ss_network_args as sd-scripts / LyCORIS write
        them (a JSON object of strings)."""
        out = {"ss_clip_skip": str(self.clip_skip)}
        n = getattr(config, "network", None)
        args = {}
        if n is not None and n.conv_dim:
            args.update(conv_dim=str(n.conv_dim), conv_alpha=f"{n.conv_alpha:g}")
        if n is not None and n.use_dora:
            args["dora_wd"] = "True"
        if args:
            out["ss_network_args"] = json.dumps(args)
        return out

    def make_noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                   ) -> NoisyBatch:
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type '{self.prediction_type}' "
                             "(expected epsilon or v_prediction)")
        return NoisyBatch(noisy=noisy, timesteps=timesteps, target=target)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dtype = self.input_dtype(self.unet)
        return self.unet(noisy.to(dtype), timesteps, cond["encoder_hidden_states"].to(dtype),
                         return_dict=False)[0]

    def sampling_pipeline(self) -> StableDiffusionPipeline:
        """The trained model as a pipeline (the LoRA follows enable/disable of the adapter)."""
        scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder,
                                       tokenizer=self.tokenizer, unet=self.unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def lora_components(self) -> dict[str, torch.nn.Module]:
        """The U-Net, and the text encoders when they train."""
        encoders = self.text_encoder_names if self._train_text_encoder else ()
        return {"unet": self.unet, **{name: getattr(self, name) for name in encoders}}
