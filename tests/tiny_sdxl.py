"""Tiny SDXL-architecture components built from config (offline, CPU, seconds).

The layout of SDXL base (after diffusers' own tiny SDXL test configs): a U-Net with
``addition_embed_type="text_time"`` (pooled text embedding + 6 size/crop ids), linear projections,
layers_per_block 2 and 1 / 2 transformer layers per attention block; CLIPTextModel +
CLIPTextModelWithProjection whose penultimate hidden states are concatenated (32 + 48 = 80 =
cross_attention_dim); projection_class_embeddings_input_dim = 6 * addition_time_embed_dim (8) +
the pooled projection (16) = 64. The two encoders differ in width so that a mixed-up concat or
pooled output fails loudly. VAE: 2 blocks (scale factor 2; 16x16 images -> 8x8 latents) with
SDXL's scaling factor. Weights depend only on `seed`; the caller's global RNG is left untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from tiny_models import (seeded_eval_modules, tiny_clip_config, tiny_clip_tokenizer, tiny_sd15_unet,
                         tiny_sd15_vae)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TE1_WIDTH, TE2_WIDTH, POOLED_DIM, TIME_EMBED_DIM = 32, 48, 16, 8


def tiny_sdxl_unet() -> UNet2DConditionModel:
    return tiny_sd15_unet(
        layers_per_block=2,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM,
        cross_attention_dim=TE1_WIDTH + TE2_WIDTH,
    )


def tiny_sdxl_vae() -> AutoencoderKL:
    return tiny_sd15_vae(scaling_factor=0.13025, force_upcast=True)


def _clip_config(tokenizer, width: int, **extra) -> CLIPTextConfig:
    return tiny_clip_config(tokenizer, width, num_hidden_layers=3, hidden_act="gelu", **extra)


def tiny_sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base's scheduler config."""
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, timestep_spacing="leading",
                                  prediction_type="epsilon")


def tiny_sdxl_components(seed: int = 0) -> dict:
    """The StableDiffusionXLPipeline components; eval mode, fp32, fixed by `seed`."""
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    unet, vae, text_encoder, text_encoder_2 = seeded_eval_modules(
        seed, tiny_sdxl_unet, tiny_sdxl_vae,
        lambda: CLIPTextModel(_clip_config(tokenizer, TE1_WIDTH)),
        lambda: CLIPTextModelWithProjection(
            _clip_config(tokenizer_2, TE2_WIDTH, projection_dim=POOLED_DIM)))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "scheduler": tiny_sdxl_scheduler()}


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(**tiny_sdxl_components(seed))


def save_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """The tiny pipeline saved in the diffusers layout (model_index.json, unet/, text_encoder_2/...)."""
    folder = Path(folder)
    tiny_sdxl_pipeline(seed).save_pretrained(folder)
    return folder


def diffusers_to_original_sdxl(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """Single-file (original SGM layout) state dict of a diffusers SDXL pipeline, the inverse of
    diffusers' single-file loading: ``model.diffusion_model.*`` (the SD1.x U-Net mapping plus
    ``label_emb``), ``first_stage_model.*``, ``conditioner.embedders.0.transformer.text_model.*``
    (CLIP ViT-L, transformers layout) and ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG
    layout: fused in_proj q/k/v, resblocks, ln_final, text_projection transposed)."""
    from sd15_single_file import (UNET_PREFIX, VAE_PREFIX, _convert, _unet_prefix_map,
                                  _vae_attention_to_conv, _vae_prefix_map)

    unet_map = _unet_prefix_map(pipe.unet.config) + [
        ("add_embedding.linear_1", "label_emb.0.0", None), ("add_embedding.linear_2", "label_emb.0.2", None)]
    checkpoint = {UNET_PREFIX + k: v for k, v in _convert(pipe.unet.state_dict(), unet_map, "unet").items()}
    vae = _vae_attention_to_conv(_convert(pipe.vae.state_dict(), _vae_prefix_map(pipe.vae.config), "vae"))
    checkpoint.update({VAE_PREFIX + k: v for k, v in vae.items()})
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        checkpoint["conditioner.embedders.0.transformer." + key] = value
    checkpoint.update(_openclip_state(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return {k: v.detach().clone().contiguous() for k, v in checkpoint.items()}


def _openclip_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection weights -> OpenCLIP text tower names (q/k/v fused)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {"positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"),
           "ln_final.bias": state.pop("final_layer_norm.bias"),
           "text_projection": state.pop("text_projection.weight").T}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(
                [state.pop(f"{src}self_attn.{p}_proj.{leaf}") for p in "qkv"])
            for old, new in renames.items():
                out[f"{dst}{new}.{leaf}"] = state.pop(f"{src}{old}.{leaf}")
    state.pop("embeddings.position_ids", None)
    if state:
        raise KeyError(f"text_encoder_2: no OpenCLIP mapping for {sorted(state)}")
    return {prefix + k: v for k, v in out.items()}
