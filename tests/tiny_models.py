"""Tiny SD1.5-architecture components built from config (offline, CPU, seconds).

`tiny_sd15_components(seed)` returns the same layout as a real SD1.5 checkpoint (cross-attention
down/mid/up blocks, AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIM scheduler) at toy sizes:
U-Net block_out_channels (32, 64), cross_attention_dim 32, sample_size 8 (latents 8x8, images
16x16). Weights depend only on `seed`; the caller's global RNG state is left untouched.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sipo_plugin.toy.tokenizer import build_tokenizer

# A few whole words so that prompts tokenize to more than single bytes.
_WORDS = ("a", "an", "the", "cat", "dog", "red", "blue", "photo", "of", "painting")


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Byte-level CLIP BPE tokenizer (the toy world's builder) over a few whole words."""
    return build_tokenizer(list(_WORDS), model_max_length=model_max_length)


@contextlib.contextmanager
def fixed_rng(seed: int) -> Iterator[None]:
    """The global (CPU) RNG seeded with `seed` inside; the caller's RNG state is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def seeded_eval_modules(seed: int, *builders: Callable[[], torch.nn.Module]
                        ) -> list[torch.nn.Module]:
    """``builders[i]()`` built with the RNG seeded to ``seed + i``, in eval mode; the caller's RNG
    state is left untouched."""
    modules = []
    for offset, build in enumerate(builders):
        with fixed_rng(seed + offset):
            modules.append(build())
    return [module.eval() for module in modules]


def tiny_sd15_unet(**overrides) -> UNet2DConditionModel:
    """The SD1.5-layout tiny U-Net (``overrides``: other UNet2DConditionModel settings)."""
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return UNet2DConditionModel(**{**config, **overrides})


def tiny_sd15_vae(**extra) -> AutoencoderKL:
    """2 blocks: scale factor 2, 16x16 images -> 8x8 latents (``extra``: e.g. SDXL's scaling)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=16,
        **extra,
    )


def tiny_clip_config(tokenizer: CLIPTokenizer, hidden_size: int = 32, num_hidden_layers: int = 2,
                     **extra) -> CLIPTextConfig:
    """A tiny CLIP text config over `tokenizer`'s vocabulary and special tokens."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def tiny_clip_text_model(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(tiny_clip_config(tokenizer))


def tiny_sd15_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_sd15_components(seed: int = 0) -> dict:
    """dict(unet, vae, text_encoder, tokenizer, scheduler); eval mode, fp32, fixed by `seed`."""
    tokenizer = tiny_clip_tokenizer()
    unet, vae, text_encoder = seeded_eval_modules(
        seed, tiny_sd15_unet, tiny_sd15_vae, lambda: tiny_clip_text_model(tokenizer))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": tiny_sd15_scheduler(),
    }


def tiny_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """StableDiffusionPipeline over `tiny_sd15_components(seed)`, without safety checker."""
    return StableDiffusionPipeline(
        **tiny_sd15_components(seed),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
