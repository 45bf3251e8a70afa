"""Stable Diffusion XL: the SD1.x adapter plus a second text encoder and per-image size ids.

The U-Net is conditioned on the concatenated penultimate hidden states of both CLIP encoders, the
pooled (projected) output of the second, and six "time ids" per image: (original height, original
width, crop top, crop left, target height, target width), as diffusers' SDXL pipeline and training
scripts build them. LoRA exports in sd-scripts format use the original SGM block names.
"""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..export.sgm_names import sgm_module_namer
from .base import Conditioning, register_model_family
from .families import FAMILIES
from .sd15 import SD15Adapter, load_pipeline_components

SIZE_KEYS = ("original_sizes", "crop_top_lefts", "target_sizes")


def load_sdxl_components(name_or_path: str, model_config: str = "") -> dict:
    """Both tokenizers and text encoders, VAE, U-Net and a DDPM training scheduler, all local."""
    return load_pipeline_components(
        name_or_path, model_config, pipeline_cls=StableDiffusionXLPipeline, architecture="SDXL",
        parts={"tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer,
               "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection,
               "vae": AutoencoderKL, "unet": UNet2DConditionModel})


def sdxl_time_ids(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor,
                  target_sizes: torch.Tensor) -> torch.Tensor:
    """[N, 2] (h, w), [N, 2] (top, left), [N, 2] (h, w) -> [N, 6] time ids
    (orig_h, orig_w, crop_top, crop_left, target_h, target_w), diffusers' `_get_add_time_ids` order."""
    parts = [torch.as_tensor(x, dtype=torch.float32).reshape(-1, 2)
             for x in (original_sizes, crop_top_lefts, target_sizes)]
    if len({p.shape[0] for p in parts}) != 1:
        raise ValueError(f"{', '.join(SIZE_KEYS)} must have one row per image, got "
                         f"{[p.shape[0] for p in parts]}")
    return torch.cat(parts, dim=1)


def batch_time_ids(batch, vae_scale_factor: int) -> torch.Tensor:
    """[2B, 6] time ids from a `PairBatch`'s sizes and crops (its extras). Without them an image
    counts as uncropped at its training size: original = target = the pixel size (of
    pixel_values, or of latents times `vae_scale_factor`), crop (0, 0)."""
    if batch.pixel_values is not None:
        images = batch.pixel_values
        count, size = images.shape[0], tuple(images.shape[-2:])
    else:
        latents = batch.latents
        count, size = latents.shape[0], tuple(s * vae_scale_factor for s in latents.shape[-2:])
    pixel_size = torch.tensor([size], dtype=torch.float32).expand(count, 2)
    fallback = {"original_sizes": pixel_size, "crop_top_lefts": torch.zeros(count, 2),
                "target_sizes": pixel_size}
    return sdxl_time_ids(*(batch.extras.get(k, fallback[k]) for k in SIZE_KEYS))


@register_model_family("sdxl")
class SDXLAdapter(SD15Adapter):
    """SDXL base (epsilon) or v-prediction fine-tunes: two CLIP encoders and size conditioning."""

    base_model_version = FAMILIES["sdxl"].base_model_version
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    load_components = staticmethod(load_sdxl_components)

    default_clip_skip = 2  # SDXL reads the penultimate layer of both encoders

    def __init__(self, components: dict, *, device: torch.device, weight_dtype: torch.dtype,
                 clip_skip: int = 0):
        self.tokenizer_2 = components["tokenizer_2"]
        self.text_encoder_2 = components["text_encoder_2"]
        super().__init__(components, device=device, weight_dtype=weight_dtype, clip_skip=clip_skip)
        self.text_encoder_2.requires_grad_(False)
        # the VAE stays fp32 (SD15Adapter): SDXL's VAE overflows in fp16
        self.text_encoder_2.to(device, dtype=self.text_encoder.dtype)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Hidden states -clip_skip (default 2: the penultimate) of both encoders, concatenated on
        the feature axis, and the second encoder's pooled projection (diffusers' SDXL
        `encode_prompt(clip_skip=clip_skip - 2)`; sd-scripts reads the penultimate always)."""
        hidden = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder),
                                   (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                            max_length=tokenizer.model_max_length).input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-self.clip_skip])
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": out.text_embeds}

    def pair_conditioning(self, cond: Conditioning, batch) -> Conditioning:
        paired = super().pair_conditioning(cond, batch)
        paired["time_ids"] = batch_time_ids(batch, self.vae_scale_factor).to(self.device)
        return paired

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dtype = self.input_dtype(self.unet)
        added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
        return self.unet(noisy.to(dtype), timesteps, cond["encoder_hidden_states"].to(dtype),
                         added_cond_kwargs=added, return_dict=False)[0]

    def sampling_pipeline(self) -> StableDiffusionXLPipeline:
        """The trained model as a pipeline (the LoRA follows enable/disable of the adapter)."""
        scheduler = EulerDiscreteScheduler.from_config(self.noise_scheduler.config)
        return StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
            scheduler=scheduler)

    def kohya_unet_namer(self):
        """sd-scripts names SDXL's U-Net modules with the original SGM block names."""
        return sgm_module_namer(self.unet.config)
