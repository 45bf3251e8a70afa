"""What the video families (CogVideoX, Wan2.1) share: a diffusers video transformer trained with a
LoRA, a frozen T5-family text encoder and a VAE, loaded from a local diffusers folder.

The families differ in how they load the folder, encode videos and prompts, noise latents and
export the LoRA; placement on the device (base-weight storage dtype, VAE tiling and slicing,
group offloading of the text encoder), the LoRA on the transformer and its switch live here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch
from .base import ModelAdapter
from .families import FAMILIES, FamilyFacts
from .peft_lora import inject_lora, lora_config

# [model] base_weights_dtype -> storage dtype of the frozen transformer weights ("": as loaded)
BASE_WEIGHT_DTYPES = {"": None, "fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}
# the subfolders of a CogVideoXPipeline / WanPipeline diffusers folder
PIPELINE_COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")


def pipeline_folder(name_or_path: str | os.PathLike, family: str) -> Path:
    """The local diffusers folder ``name_or_path`` (model_index.json and every one of
    PIPELINE_COMPONENTS), or a one-line ValueError naming what is missing."""
    path = Path(name_or_path)
    missing = [c for c in PIPELINE_COMPONENTS if not (path / c).is_dir()]
    if not (path / "model_index.json").is_file() or missing:
        raise ValueError(f"{path}: not a {family} diffusers folder (needs model_index.json and "
                         f"{', '.join(PIPELINE_COMPONENTS)}; missing "
                         f"{', '.join(missing) or 'model_index.json'})")
    return path


def offload_text_encoder(text_encoder: torch.nn.Module, device: torch.device, *,
                         use_stream: bool) -> None:
    """diffusers group offloading of a frozen text encoder (T5, UMT5), leaf by leaf: its weights
    stay in CPU memory and each layer comes to ``device`` for its forward (prefetched on a CUDA
    stream).

    Only modules that run without gradients are offloaded: diffusers' hooks move a block's weights
    back to the CPU right after its forward, which breaks the backward pass of the trained
    transformer ("Expected all tensors to be on the same device", bghira/SimpleTuner#1975).
    """
    from diffusers.hooks import apply_group_offloading  # only when group offloading is asked for
    apply_group_offloading(text_encoder, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="leaf_level", use_stream=use_stream)


class VideoTransformerAdapter(ModelAdapter):
    """A video transformer (the denoiser, carrying the LoRA) + a frozen text encoder + a VAE."""

    denoiser_name = "transformer"
    frozen_encoder_names = ("text_encoder",)
    group_offload_note = ""  # a warning logged when group offloading is on (empty: none)
    # (name_or_path, weight_dtype) -> components dict: tokenizer, text_encoder, transformer, vae,
    # scheduler (+ family extras)
    load_components: Callable[[str, torch.dtype], dict]

    @property
    def facts(self) -> FamilyFacts:
        """The family's declaration (frame count, size multiple, display name, LoRA formats)."""
        return FAMILIES[self.family]

    is_video = True
    video_size_multiple = property(lambda self: self.facts.video_size_multiple)
    frame_step = property(lambda self: self.facts.frame_step)  # clips are frame_step * k + 1 frames
    display_name = property(lambda self: self.facts.display_name)
    text_encoder_kind = property(lambda self: self.facts.text_encoder_kind)

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
        # cast (and store in fp8) before moving: the device never holds the wider copy
        self.cast_frozen_weights(weight_dtype)
        self.vae.to(self.device)
        if vae_tiling:
            self.vae.enable_tiling()
        if vae_slicing:
            self.vae.enable_slicing()
        storage = BASE_WEIGHT_DTYPES[base_weights_dtype]
        if storage is not None and storage != weight_dtype:
            # frozen base weights stored in `storage`, cast per layer to the compute dtype; applied
            # before the LoRA is injected so the (fp32) LoRA weights are never cast
            self.transformer.enable_layerwise_casting(storage_dtype=storage,
                                                      compute_dtype=weight_dtype)
        self.transformer.to(self.device)
        self.place_text_encoder(group_offload)

    def cast_frozen_weights(self, weight_dtype: torch.dtype) -> None:
        """The family's precision of the components, set before they move to the device
        (default: as loaded)."""

    def place_text_encoder(self, group_offload: bool) -> None:
        """The frozen text encoder (CogVideoX's T5: 4.7B parameters) on the device, or, with
        group offloading on CUDA, in CPU memory with each layer moved to the GPU for its forward.
        The transformer is not offloaded: it carries the trained LoRA, whose weights and optimizer
        state must stay on the GPU."""
        logger = logging.getLogger(type(self).__module__)  # the family's logger
        self.group_offloaded = group_offload and self.device.type == "cuda"
        if self.group_offloaded:
            self.text_encoder.to("cpu")
            offload_text_encoder(self.text_encoder, self.device, use_stream=True)
            if self.group_offload_note:
                logger.warning(self.group_offload_note)
            return
        if group_offload:
            logger.warning("group_offload needs a CUDA device; ignored on %s", self.device.type)
        self.text_encoder.to(self.device)

    @classmethod
    def load(cls, model_cfg, *, device: torch.device, weight_dtype: torch.dtype = torch.float32):
        components = cls.load_components(model_cfg.pretrained_model_name_or_path, weight_dtype)
        return cls(components, device=device, weight_dtype=weight_dtype,
                   base_weights_dtype=getattr(model_cfg, "base_weights_dtype", ""),
                   group_offload=getattr(model_cfg, "group_offload", False),
                   vae_tiling=getattr(model_cfg, "vae_tiling", False),
                   vae_slicing=getattr(model_cfg, "vae_slicing", False))

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block in the backward pass instead of storing activations
        (the loop does this for [training] gradient_checkpointing via trainable_modules())."""
        self.transformer.enable_gradient_checkpointing()

    def add_lora(self, network) -> list[torch.nn.Parameter]:
        inject_lora(self.transformer, lora_config(rank=network.network_dim,
                                                  alpha=network.network_alpha,
                                                  targets=network.network_target_modules))
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        for p in params:  # LoRA weights train in fp32 on the device, whatever the base storage
            p.data = p.data.to(self.device, torch.float32)
        return params

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.transformer]

    def lora_components(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer}
