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
import logging
from pathlib import Path

import torch
from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline,
                       WanTransformer3DModel)
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.schedulers import UniPCMultistepScheduler
from peft import LoraConfig
from transformers import AutoTokenizer, UMT5EncoderModel

from .base import Conditioning, Generators, ModelAdapter, NoisyBatch, per_pair, register_model_family

logger = logging.getLogger(__name__)

WAN_TEXT_LENGTH = 512  # WanPipeline's default max_sequence_length (the original Wan text_len)
BASE_WEIGHT_DTYPES = {"": None, "fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}
_COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")


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


def offload_text_encoder(text_encoder: torch.nn.Module, device: torch.device, *,
                         use_stream: bool) -> None:
    """diffusers group offloading of the frozen UMT5 encoder, leaf by leaf: its weights stay in CPU
    memory and each layer comes to ``device`` for its forward (prefetched on a CUDA stream).

    Only modules that run without gradients are offloaded: diffusers' hooks move a block's weights
    back to the CPU right after its forward, which breaks the backward pass of the trained
    transformer ("Expected all tensors to be on the same device", bghira/SimpleTuner#1975).
    """
    from diffusers.hooks import apply_group_offloading
    apply_group_offloading(text_encoder, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="leaf_level", use_stream=use_stream)


def load_wan_components(name_or_path: str, weight_dtype: torch.dtype = torch.float32) -> dict:
    """Tokenizer, UMT5 encoder and transformer (in ``weight_dtype``; diffusers keeps the
    precision-critical transformer modules in fp32), fp32 VAE and the folder's (sampling)
    scheduler plus the flow-matching training scheduler, all local."""
    path = Path(name_or_path)
    missing = [c for c in _COMPONENTS if not (path / c).is_dir()]
    if not (path / "model_index.json").is_file() or missing:
        raise ValueError(f"{path}: not a Wan diffusers folder (needs model_index.json and "
                         f"{', '.join(_COMPONENTS)}; missing {', '.join(missing) or 'model_index.json'})")
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
class WanAdapter(ModelAdapter):
    """Wan2.1 T2V: rectified-flow transformer on normalized video latents, UMT5 text."""

    base_model_version = "wan2.1"
    modelspec_architecture = "wan2.1/lora"  # musubi-tuner's sai_model_spec ARCH_WAN + "/lora"
    prediction_type = "flow"
    lora_formats = ("wan", "musubi")  # [export] lora_format; "kohya" is refused at config time
    is_video = True
    video_size_multiple = 16  # VAE 8x spatial compression x transformer patch 2
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
        self.sampling_scheduler = components.get("sampling_scheduler", self.noise_scheduler)
        self.device = torch.device(device)
        self.compute_dtype = weight_dtype
        self.flow_shift = float(self.noise_scheduler.config.shift)
        for module in (self.text_encoder, self.vae, self.transformer):
            module.requires_grad_(False)
        self.group_offloaded = group_offload and self.device.type == "cuda"
        if self.group_offloaded:
            offload_text_encoder(self.text_encoder, self.device, use_stream=True)
            logger.warning("group_offload: the UMT5 text encoder runs leaf by leaf from CPU memory; "
                           "the trained transformer stays on the GPU (use base_weights_dtype and "
                           "gradient_checkpointing for it)")
        else:
            if group_offload:
                logger.warning("group_offload needs a CUDA device; ignored on %s", self.device.type)
            self.text_encoder.to(self.device)
        self.vae.to(self.device)  # fp32: WanPipeline's documented VAE precision
        if vae_tiling:
            self.vae.enable_tiling()
        if vae_slicing:
            self.vae.enable_slicing()
        storage = BASE_WEIGHT_DTYPES[base_weights_dtype]
        if storage is not None and storage != weight_dtype:
            # frozen base weights stored in `storage`, cast per layer to the compute dtype; applied
            # before the LoRA is injected so the (fp32) LoRA weights are never cast
            self.transformer.enable_layerwise_casting(storage_dtype=storage, compute_dtype=weight_dtype)
        self.transformer.to(self.device)

    @classmethod
    def load(cls, model_cfg, *, device: torch.device, weight_dtype: torch.dtype = torch.float32):
        components = load_wan_components(model_cfg.pretrained_model_name_or_path, weight_dtype)
        return cls(components, device=device, weight_dtype=weight_dtype,
                   base_weights_dtype=getattr(model_cfg, "base_weights_dtype", ""),
                   group_offload=getattr(model_cfg, "group_offload", False),
                   vae_tiling=getattr(model_cfg, "vae_tiling", False),
                   vae_slicing=getattr(model_cfg, "vae_slicing", False))

    @classmethod
    def check_config(cls, config) -> None:
        """Family-specific settings, checked before anything loads (ValueError, one line)."""
        from ..export.wan import check_musubi_targets
        if config.network.train_text_encoder:
            raise ValueError("train_text_encoder is not supported for Wan (the UMT5 encoder stays "
                             "frozen); set it to false")
        if getattr(config.network, "finetune", "lora") == "full" and config.model.base_weights_dtype:
            raise ValueError("base_weights_dtype stores the frozen base weights in low precision, but "
                             "finetune = \"full\" trains them; set base_weights_dtype = \"\"")
        if config.export.lora_format == "musubi":
            check_musubi_targets(config.network.network_target_modules)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block in the backward pass instead of storing activations
        (the loop does this for [training] gradient_checkpointing via trainable_modules())."""
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

    def export_lora(self, path, *, lora_format: str, network_alpha: float, metadata: dict):
        """One .safetensors file ('.safetensors' is appended to a path without it)."""
        from ..export.wan import export_wan_lora
        if lora_format not in self.lora_formats:
            raise ValueError(f"lora_format '{lora_format}' is not a Wan LoRA format; use 'wan' or "
                             "'musubi'")
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        return export_wan_lora(path, transformer=self.transformer, network_alpha=network_alpha,
                               format=lora_format, metadata=metadata)
