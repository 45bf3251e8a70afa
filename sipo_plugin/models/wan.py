"""Wan2.1 text-to-video (WanTransformer3DModel + AutoencoderKLWan + UMT5) as a rectified flow.

Loaded from a local diffusers folder in the WanPipeline layout (model_index.json, tokenizer/,
text_encoder/, transformer/, vae/, scheduler/), e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers.

- Flow: ``x_s = (1 - s) x0 + s eps``, target ``eps - x0``, model timestep ``s * 1000``: the
  convention of diffusers' FlowMatchEulerDiscreteScheduler and WanPipeline, and what the objectives
  read back (``s = t / num_train_timesteps``, sipo_plugin/objectives/schedule.py).
- Training s: musubi-tuner's ``--timestep_sampling shift`` (its recommended Wan setting;
  NetworkTrainer.get_noisy_model_input_and_timesteps, hv_train_network.py in older versions): a
  logit-normal draw ``u = sigmoid(n)``, ``n ~ N(0, 1)`` (sigmoid_scale 1), not a uniform one, then
  shifted ``s = shift u / (1 + (shift - 1) u)`` with the folder's flow shift (3.0 for 480p). musubi
  feeds the model ``s * 1000 + 1``; this adapter feeds ``s * 1000`` (diffusers' and WanPipeline's
  sigma * 1000) so that training, sampling and the objectives agree on s.
- Latents: the VAE posterior mean (the original Wan VAE encodes to the mean), normalized per channel
  ``(z - latents_mean) / latents_std``: the inverse of WanPipeline's decode.
- Text: UMT5 hidden states of 512 tokens, zero past the prompt's tokens (WanPipeline
  ``_get_t5_prompt_embeds`` with its default max_sequence_length).
"""

from __future__ import annotations

import json

import torch
from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline,
                       WanTransformer3DModel)
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.schedulers import UniPCMultistepScheduler
from transformers import AutoTokenizer, UMT5EncoderModel

from .families import FAMILIES
from .base import Conditioning, Generators, NoisyBatch, per_pair, register_model_family
from .video_base import (VideoTransformerAdapter, offload_text_encoder,  # noqa: F401  (re-exported)
                         pipeline_folder)

WAN_TEXT_LENGTH = 512  # WanPipeline's default max_sequence_length (the original Wan text_len)


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """``s = shift * u / (1 + (shift - 1) * u)``: maps (0, 1) onto itself, towards 1 for shift > 1."""
    return shift * u / (1 + (shift - 1) * u)


def flow_noisy(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_s = (1 - s) x0 + s eps`` and the velocity target ``eps - x0`` for per-sample s [N]."""
    s = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    return (1 - s) * latents + s * noise, noise - latents


def normalize_latents(z: torch.Tensor, mean, std) -> torch.Tensor:
    """``(z - mean) / std`` per channel (dim 1) of [N, C, F, H, W] VAE latents."""
    shape = (1, -1) + (1,) * (z.ndim - 2)
    return (z - torch.tensor(mean, dtype=z.dtype, device=z.device).view(shape)) / \
        torch.tensor(std, dtype=z.dtype, device=z.device).view(shape)


def denormalize_latents(latents: torch.Tensor, mean, std) -> torch.Tensor:
    """``latents * std + mean``: what WanPipeline does before ``vae.decode``."""
    shape = (1, -1) + (1,) * (latents.ndim - 2)
    return latents * torch.tensor(std, dtype=latents.dtype, device=latents.device).view(shape) + \
        torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(shape)


def read_flow_shift(scheduler_config: dict) -> float:
    """The folder's flow shift: ``flow_shift`` (UniPC, as Wan ships) or ``shift`` (FlowMatch)."""
    for key in ("flow_shift", "shift"):
        if scheduler_config.get(key) is not None:
            return float(scheduler_config[key])
    return 1.0


def load_wan_components(name_or_path: str, weight_dtype: torch.dtype = torch.float32) -> dict:
    """Tokenizer, UMT5 encoder and transformer (in ``weight_dtype``; diffusers keeps the
    precision-critical transformer modules in fp32), fp32 VAE and the folder's (sampling)
    scheduler plus the flow-matching training scheduler, all local."""
    path = pipeline_folder(name_or_path, "Wan")
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    sampling_cls = (FlowMatchEulerDiscreteScheduler
                    if scheduler_config.get("_class_name") == "FlowMatchEulerDiscreteScheduler"
                    else UniPCMultistepScheduler)
    return {
        "tokenizer": AutoTokenizer.from_pretrained(path / "tokenizer"),
        "text_encoder": UMT5EncoderModel.from_pretrained(path / "text_encoder", dtype=weight_dtype),
        "transformer": WanTransformer3DModel.from_pretrained(path / "transformer",
                                                             torch_dtype=weight_dtype),
        "vae": AutoencoderKLWan.from_pretrained(path / "vae"),
        "sampling_scheduler": sampling_cls.from_config(scheduler_config),
        "scheduler": FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
            shift=read_flow_shift(scheduler_config)),
    }


@register_model_family("wan")
class WanAdapter(VideoTransformerAdapter):
    """Wan2.1 T2V: rectified-flow transformer on normalized video latents, UMT5 text."""

    base_model_version = FAMILIES["wan"].base_model_version
    modelspec_architecture = "wan2.1/lora"  # musubi-tuner's sai_model_spec ARCH_WAN + "/lora"
    prediction_type = FAMILIES["wan"].prediction_types[0]  # "flow"
    lora_formats = FAMILIES["wan"].lora_formats  # [export] lora_format
    group_offload_note = ("group_offload: the UMT5 text encoder runs leaf by leaf from CPU memory; "
                          "the trained transformer stays on the GPU (use base_weights_dtype and "
                          "gradient_checkpointing for it)")
    # transformer and UMT5 load in the compute dtype (diffusers and transformers keep their
    # precision-critical modules in fp32); the VAE stays fp32, WanPipeline's documented precision
    load_components = staticmethod(load_wan_components)

    def __init__(self, components: dict, **options):
        super().__init__(components, **options)
        self.sampling_scheduler = components.get("sampling_scheduler", self.noise_scheduler)
        self.flow_shift = float(self.noise_scheduler.config.shift)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: Generators) -> torch.Tensor:
        """[N, 3, F, H, W] videos in [-1, 1] -> normalized latents [N, C, 1 + (F - 1) / 4, H / 8, W / 8]
        (the posterior mean: no draw, ``generator`` is unused)."""
        if pixel_values.ndim != 5:
            raise ValueError(f"Wan encodes videos [N, 3, F, H, W], got shape {tuple(pixel_values.shape)}")
        temporal = self.vae.config.scale_factor_temporal
        spatial = self.vae.config.scale_factor_spatial * self.transformer.config.patch_size[1]
        frames, height, width = pixel_values.shape[2:]
        if (frames - 1) % temporal or height % spatial or width % spatial:
            raise ValueError(f"Wan needs {temporal}k+1 frames and sizes divisible by {spatial}, got "
                             f"{frames} frames of {height}x{width} (set num_frames, video_height, "
                             "video_width)")
        z = self.vae.encode(pixel_values.to(self.device, torch.float32)).latent_dist.mode()
        return normalize_latents(z, self.vae.config.latents_mean, self.vae.config.latents_std)

    @torch.no_grad()  # the UMT5 encoder is frozen
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        text = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                              max_length=WAN_TEXT_LENGTH, truncation=True, add_special_tokens=True,
                              return_attention_mask=True, return_tensors="pt")
        mask = text.attention_mask.to(self.device)
        hidden = self.text_encoder(text.input_ids.to(self.device), mask).last_hidden_state
        # zero past each prompt's tokens, as WanPipeline does (the mask is a prefix: right padding)
        return {"encoder_hidden_states": hidden * mask.unsqueeze(-1).to(hidden.dtype)}

    def draw_noise_and_timesteps(self, pair_latent_shape: torch.Size, generator: Generators
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise [B, ...] and timesteps ``s * N`` [B] (float), s logit-normal then shifted;
        ``generator``: one stream, or one per pair."""
        noise, normals = [], []
        for g in per_pair(generator, pair_latent_shape[0]):
            noise.append(torch.randn(pair_latent_shape[1:], generator=g, device=g.device))
            normals.append(torch.randn((), generator=g, device=g.device))
        sigmas = shift_sigmas(torch.sigmoid(torch.stack(normals)), self.flow_shift)
        return torch.stack(noise), sigmas * self.noise_scheduler.config.num_train_timesteps

    def make_noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                   ) -> NoisyBatch:
        sigmas = timesteps.float() / self.noise_scheduler.config.num_train_timesteps
        noisy, target = flow_noisy(latents, noise, sigmas)
        return NoisyBatch(noisy=noisy, timesteps=timesteps, target=target)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
                ) -> torch.Tensor:
        dtype = self.compute_dtype
        return self.transformer(hidden_states=noisy.to(dtype), timestep=timesteps,
                                encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                                return_dict=False)[0]

    def sampling_pipeline(self) -> WanPipeline:
        """The trained model as a WanPipeline with the folder's sampler (UniPC, flow shift)."""
        return WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder,
                           transformer=self.transformer, vae=self.vae,
                           scheduler=self.sampling_scheduler)

    def sampling_kwargs(self) -> dict:
        """Sample clips during training: 33 frames (2 s at 16 fps) at Wan2.1's 480p size."""
        return {"num_frames": 33, "height": 480, "width": 832}
