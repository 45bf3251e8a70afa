"""PEFT LoRA -> the diffusers/PEFT file layout that `pipe.load_lora_weights` reads.

Keys are ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight`` (component ``unet`` or
``text_encoder``), what `StableDiffusionPipeline.save_lora_weights` writes. The file stores no
alpha, and every loader then uses scale 1, so the scale alpha / rank is folded into lora_B here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .peft_state import alpha_for, clip_text_path, split_peft_state_dict

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")


def peft_to_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    *,
    prefix: str,
    alpha: float | Mapping[str, float],
) -> dict[str, torch.Tensor]:
    """`get_peft_model_state_dict` dict -> ``<prefix>.<path>.lora_A/B.weight``, B times alpha/r."""
    if prefix not in DIFFUSERS_COMPONENTS:
        raise ValueError(f"diffusers component prefix must be one of {DIFFUSERS_COMPONENTS}")
    out: dict[str, torch.Tensor] = {}
    for module, pair in split_peft_state_dict(state_dict).items():
        scale = alpha_for(alpha, module) / pair.rank
        path = clip_text_path(module) if prefix.startswith("text_encoder") else module
        up = pair.up.detach().cpu()
        out[f"{prefix}.{path}.lora_A.weight"] = pair.down.detach().cpu().contiguous()
        out[f"{prefix}.{path}.lora_B.weight"] = (up.float() * scale).to(up.dtype).contiguous()
        if pair.magnitude is not None:  # DoRA, in peft's own shape ([out], conv [1, out, 1, 1])
            # and key (transformers' text-encoder loader needs the ".weight")
            shape = (1, -1, 1, 1) if pair.down.ndim == 4 else (-1,)
            out[f"{prefix}.{path}.lora_magnitude_vector.weight"] = (
                pair.magnitude.detach().cpu().reshape(shape).contiguous())
    return out
