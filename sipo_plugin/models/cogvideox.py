"""CogVideoX text-to-video (CogVideoXTransformer3DModel + AutoencoderKLCogVideoX + T5) as v-prediction.

Loaded from a local diffusers folder in the CogVideoXPipeline layout (model_index.json, tokenizer/,
text_encoder/, transformer/, vae/, scheduler/), e.g. THUDM/CogVideoX-2b or CogVideoX-5b.

- Training scheduler: `CogVideoXDDIMScheduler` from the folder's scheduler config: v-prediction on
  ``abar_t`` with the SNR shift ``abar / (s + (1 - s) abar)`` (``snr_shift_scale`` s: 3 for 2b,
  1 for 5b) and zero terminal SNR (``abar_{T-1} = 0``). The objectives read SNR from its
  ``alphas_cumprod``: finite at ``SNR = 0``, step-wise weight 0 at ``t = 0``
  (sipo_plugin/objectives/schedule.py).
- Error: v-MSE, target ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (``scheduler.get_velocity``). The
  diffusers CogVideoX LoRA example's loss ``|x0_pred - x0|^2 / (1 - abar)`` is the same number.
- Latents: ``[N, F', C, H/8, W/8]`` (frames before channels, the transformer's layout), a sample of
  the VAE posterior times ``scaling_factor``; ``F' = 1 + (F - 1) / 4``.
- Text: T5 hidden states of ``max_text_seq_length`` tokens (226), padded: CogVideoXPipeline's
  ``_get_t5_prompt_embeds``.
- 3D RoPE (``use_rotary_positional_embeddings``, the 5b models): CogVideoXPipeline's
  ``_prepare_rotary_positional_embeddings``, from the latent grid.
"""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                       CogVideoXTransformer3DModel)
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from transformers import T5EncoderModel, T5Tokenizer

from .families import FAMILIES
from .base import Conditioning, Generators, NoisyBatch, register_model_family
from .video_base import VideoTransformerAdapter, pipeline_folder


def load_cogvideox_components(name_or_path: str, dtype: torch.dtype = torch.float32) -> dict:
    """Tokenizer, T5 encoder, transformer, VAE and the v-prediction training scheduler, all local
    (T5 and transformer loaded in ``dtype``: no fp32 copy of the 5b model in memory)."""
    path = pipeline_folder(name_or_path, "CogVideoX")
    return {
        "tokenizer": T5Tokenizer.from_pretrained(path, subfolder="tokenizer"),
        "text_encoder": T5EncoderModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype),
        "transformer": CogVideoXTransformer3DModel.from_pretrained(path, subfolder="transformer",
                                                                   torch_dtype=dtype),
        "vae": AutoencoderKLCogVideoX.from_pretrained(path, subfolder="vae"),
        # DDIM or DPM in the folder: both derive the same alphas_cumprod from the same config keys
        "scheduler": CogVideoXDDIMScheduler.from_pretrained(path, subfolder="scheduler"),
    }


def rotary_embeddings(transformer_config, latent_frames: int, latent_height: int, latent_width: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cos, sin) of the 3D RoPE over the latent grid, as CogVideoXPipeline computes them (1.0: a
    crop region of the base grid; 1.5, with ``patch_size_t``: sliced from the max grid); None
    for models without rotary embeddings."""
    c = transformer_config
    if not c.use_rotary_positional_embeddings:
        return None
    p, p_t = c.patch_size, c.patch_size_t
    grid_height, grid_width = latent_height // p, latent_width // p
    base_height, base_width = c.sample_height // p, c.sample_width // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((grid_height, grid_width), base_width, base_height)
        return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=crops,
                                       grid_size=(grid_height, grid_width),
                                       temporal_size=latent_frames, device=device)
    return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=None,
                                   grid_size=(grid_height, grid_width),
                                   temporal_size=(latent_frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(base_height, base_width), device=device)


@register_model_family("cogvideox")
class CogVideoXAdapter(VideoTransformerAdapter):
    """CogVideoX T2V: v-prediction transformer on video latents with SNR shift, T5 text."""

    base_model_version = FAMILIES["cogvideox"].base_model_version
    modelspec_architecture = "cogvideox/lora"
    sample_num_frames = 9  # short sample clips (3 latent frames)
    load_components = staticmethod(load_cogvideox_components)

    def cast_frozen_weights(self, weight_dtype: torch.dtype) -> None:
        """Transformer and T5 in the compute dtype; the VAE too off the CPU (CogVideoX's VAE runs
        in fp16/bf16 in its pipelines; it stays fp32 on the CPU)."""
        if self.device.type != "cpu":
            self.vae.to(dtype=weight_dtype)
        for module in (self.transformer, self.text_encoder):
            if module.dtype != weight_dtype:
                module.to(dtype=weight_dtype)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: Generators) -> torch.Tensor:
        """[N, 3, F, H, W] videos in [-1, 1] -> latents [N, 1 + (F - 1) / 4, C, H / 8, W / 8],
        a posterior sample (``generator``: one, or one per video) times ``scaling_factor``."""
        if pixel_values.ndim != 5:
            raise ValueError(f"CogVideoX encodes videos [N, 3, F, H, W], got shape "
                             f"{tuple(pixel_values.shape)}")
        frames, height, width = pixel_values.shape[2:]
        step, multiple = self.frame_step, self.video_size_multiple
        if (frames - 1) % step or height % multiple or width % multiple:
            raise ValueError(f"CogVideoX needs {step}k+1 frames and sizes divisible by "
                             f"{self.video_size_multiple}, got {frames} frames of {height}x{width} "
                             "(set num_frames, video_height, video_width)")
        p_t = self.transformer.config.patch_size_t
        if p_t and ((frames - 1) // 4 + 1) % p_t:
            latent = (frames - 1) // 4 + 1
            fits = [4 * (latent - latent % p_t) - 3, 4 * (latent - latent % p_t + p_t) - 3]
            raise ValueError(f"num_frames = {frames} gives {latent} latent frames; this CogVideoX "
                             f"(1.5, patch_size_t = {p_t}) needs a multiple of {p_t}: use "
                             f"num_frames = {' or '.join(str(f) for f in fits if f > 0)}")
        latent_dist = self.vae.encode(pixel_values.to(self.device, self.vae.dtype)).latent_dist
        z = latent_dist.sample(generator=generator) * self.vae.config.scaling_factor  # [N,C,F',h,w]
        return z.permute(0, 2, 1, 3, 4).float().contiguous()  # [N, F', C, h, w]

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        ids = self.tokenizer(prompts, padding="max_length", truncation=True, add_special_tokens=True,
                             max_length=self.transformer.config.max_text_seq_length,
                             return_tensors="pt").input_ids
        return {"encoder_hidden_states": self.text_encoder(ids.to(self.device))[0]}

    def make_noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                   ) -> NoisyBatch:
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type not in self.facts.prediction_types:  # v_prediction
            raise ValueError(f"CogVideoX trains v-prediction; the scheduler says "
                             f"'{self.prediction_type}'")
        target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return NoisyBatch(noisy=noisy, timesteps=timesteps, target=target)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """v prediction [2B, F', C, h, w] for noisy latents of the same shape."""
        frames, _, height, width = noisy.shape[1:]
        rope = rotary_embeddings(self.transformer.config, frames, height, width, noisy.device)
        dtype = self.compute_dtype
        return self.transformer(hidden_states=noisy.to(dtype), timestep=timesteps,
                                encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                                image_rotary_emb=rope, return_dict=False)[0]

    def sampling_pipeline(self) -> CogVideoXPipeline:
        """The trained model as a CogVideoXPipeline (DDIM on the folder's schedule)."""
        return CogVideoXPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder,
                                 vae=self.vae, transformer=self.transformer,
                                 scheduler=CogVideoXDDIMScheduler.from_config(self.noise_scheduler.config))

    def sampling_kwargs(self) -> dict:
        """Short clips at the model's native size (sample_height/width of the transformer)."""
        c, spatial = self.transformer.config, 2 ** (len(self.vae.config.block_out_channels) - 1)
        return {"num_frames": self.sample_num_frames, "height": c.sample_height * spatial,
                "width": c.sample_width * spatial}
