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

import logging
from pathlib import Path

import torch
from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                       CogVideoXTransformer3DModel)
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from peft import LoraConfig
from transformers import T5EncoderModel, T5Tokenizer

from .base import Conditioning, Generators, ModelAdapter, NoisyBatch, register_model_family

logger = logging.getLogger(__name__)

BASE_WEIGHT_DTYPES = {"": None, "fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}
_COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")


def load_cogvideox_components(name_or_path: str, dtype: torch.dtype = torch.float32) -> dict:
    """Tokenizer, T5 encoder, transformer, VAE and the v-prediction training scheduler, all local
    (T5 and transformer loaded in ``dtype``: no fp32 copy of the 5b model in memory)."""
    path = Path(name_or_path)
    missing = [c for c in _COMPONENTS if not (path / c).is_dir()]
    if not (path / "model_index.json").is_file() or missing:
        raise ValueError(f"{path}: not a CogVideoX diffusers folder (needs model_index.json and "
                         f"{', '.join(_COMPONENTS)}; missing {', '.join(missing) or 'model_index.json'})")
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
class CogVideoXAdapter(ModelAdapter):
    """CogVideoX T2V: v-prediction transformer on video latents with SNR shift, T5 text."""

    base_model_version = "cogvideox"
    modelspec_architecture = "cogvideox/lora"
    lora_formats = ("diffusers",)  # keys transformer.<path>.lora_A.weight (CogVideoXPipeline loads)
    is_video = True
    video_size_multiple = 16  # VAE 8x spatial compression x transformer patch 2
    sample_num_frames = 9  # short sample clips (3 latent frames)
    denoiser_name = "transformer"
    frozen_encoder_names = ("text_encoder",)

    def __init__(self, components: dict, *, device: torch.device, weight_dtype: torch.dtype,
                 base_weights_dtype: str = "", group_offload: bool = False,
                 vae_tiling: bool = False, vae_slicing: bool = False):
        self.tokenizer = components["tokenizer"]
        self.text_encoder = components["text_encoder"]
        self.vae = components["vae"]
        self.transformer = components["transformer"]
        self.noise_scheduler = components["scheduler"]
        self.device = torch.device(device)
        self.compute_dtype = weight_dtype
        for module in (self.text_encoder, self.vae, self.transformer):
            module.requires_grad_(False)
        if self.device.type != "cpu":  # the VAE stays fp32 on the CPU
            self.vae.to(dtype=weight_dtype)  # CogVideoX's VAE runs in fp16/bf16 in its pipelines
        self.vae.to(self.device)
        if vae_tiling:
            self.vae.enable_tiling()
        if vae_slicing:
            self.vae.enable_slicing()
        # cast (and store in fp8) before moving: the device never holds the wider copy
        if self.transformer.dtype != weight_dtype:
            self.transformer.to(dtype=weight_dtype)
        storage = BASE_WEIGHT_DTYPES[base_weights_dtype]
        if storage is not None and storage != weight_dtype:
            # frozen base weights stored in `storage`, cast per layer to the compute dtype; applied
            # before the LoRA is injected so the (fp32) LoRA weights are never cast
            self.transformer.enable_layerwise_casting(storage_dtype=storage, compute_dtype=weight_dtype)
        self.transformer.to(self.device)
        if self.text_encoder.dtype != weight_dtype:
            self.text_encoder.to(dtype=weight_dtype)
        self._place_text_encoder(group_offload)

    def _place_text_encoder(self, group_offload: bool) -> None:
        """The frozen T5 (4.7B parameters in the real models) on the device, or, with group
        offloading on CUDA, in CPU memory with each layer moved to the GPU for its forward. The
        transformer is not offloaded: it carries the trained LoRA, whose weights and optimizer
        state must stay on the GPU."""
        if group_offload and self.device.type == "cuda":
            self.text_encoder.to("cpu")
            from diffusers.hooks import apply_group_offloading
            apply_group_offloading(self.text_encoder, onload_device=self.device,
                                   offload_device=torch.device("cpu"), offload_type="leaf_level",
                                   use_stream=True)
            return
        if group_offload:
            logger.warning("group_offload needs a CUDA device; ignored on %s", self.device.type)
        self.text_encoder.to(self.device)

    @classmethod
    def load(cls, model_cfg, *, device: torch.device, weight_dtype: torch.dtype = torch.float32):
        components = load_cogvideox_components(model_cfg.pretrained_model_name_or_path, weight_dtype)
        return cls(components, device=device, weight_dtype=weight_dtype,
                   base_weights_dtype=getattr(model_cfg, "base_weights_dtype", ""),
                   group_offload=getattr(model_cfg, "group_offload", False),
                   vae_tiling=getattr(model_cfg, "vae_tiling", False),
                   vae_slicing=getattr(model_cfg, "vae_slicing", False))

    @classmethod
    def check_config(cls, config) -> None:
        """Family-specific settings, checked before anything loads (ValueError, one line)."""
        if config.network.train_text_encoder:
            raise ValueError("train_text_encoder is not supported for CogVideoX (the T5 encoder "
                             "stays frozen); set it to false")

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block in the backward pass instead of storing activations."""
        self.transformer.enable_gradient_checkpointing()

    def add_lora(self, network) -> list[torch.nn.Parameter]:
        config = LoraConfig(r=network.network_dim, lora_alpha=network.network_alpha,
                            init_lora_weights=True, target_modules=list(network.network_target_modules))
        self.transformer.add_adapter(config)
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        for p in params:  # LoRA weights train in fp32 on the device, whatever the base storage
            p.data = p.data.to(self.device, torch.float32)
        return params

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.transformer]

    def set_adapters_enabled(self, enabled: bool) -> None:
        self.transformer.enable_adapters() if enabled else self.transformer.disable_adapters()

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: Generators) -> torch.Tensor:
        """[N, 3, F, H, W] videos in [-1, 1] -> latents [N, 1 + (F - 1) / 4, C, H / 8, W / 8],
        a posterior sample (``generator``: one, or one per video) times ``scaling_factor``."""
        if pixel_values.ndim != 5:
            raise ValueError(f"CogVideoX encodes videos [N, 3, F, H, W], got shape "
                             f"{tuple(pixel_values.shape)}")
        frames, height, width = pixel_values.shape[2:]
        if (frames - 1) % 4 or height % self.video_size_multiple or width % self.video_size_multiple:
            raise ValueError(f"CogVideoX needs 4k+1 frames and sizes divisible by "
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
        if self.prediction_type != "v_prediction":
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

    def export_lora(self, path, *, lora_format: str, network_alpha: float, metadata: dict):
        """``transformer.<path>.lora_A/B.weight`` (alpha / rank folded into B) in one .safetensors
        file ('.safetensors' is appended to a path without it); ``load_lora_weights`` reads it."""
        if lora_format not in self.lora_formats:
            raise ValueError(f"lora_format '{lora_format}' is not a CogVideoX LoRA format; use "
                             "'diffusers'")
        return export_cogvideox_lora(path, self.transformer, network_alpha=network_alpha,
                                     metadata=metadata)


def export_cogvideox_lora(path, transformer: torch.nn.Module, *, network_alpha: float | None,
                          metadata: dict | None = None) -> Path:
    """The transformer's PEFT LoRA as diffusers keys ``transformer.<module>.lora_A.weight``."""
    from collections import Counter

    from ..export.diffusers_format import peft_to_diffusers
    from ..export.lora import _base_metadata
    from ..export.metadata import stringify_metadata
    from ..export.peft_state import check_alphas, lora_state_of, split_peft_state_dict
    from ..utils.io import save_safetensors_atomic
    state, alphas = lora_state_of(transformer)
    tensors = peft_to_diffusers(state, prefix="transformer", alpha=check_alphas(alphas, network_alpha))
    ranks = Counter(pair.rank for pair in split_peft_state_dict(state).values())
    meta = {"format": "pt", **_base_metadata(ranks, network_alpha), **stringify_metadata(metadata)}
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    return save_safetensors_atomic(tensors, path, meta)
