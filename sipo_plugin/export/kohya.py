"""PEFT LoRA -> sd-scripts (kohya) keys, the layout WebUI and ComfyUI load for SD1.5.

``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`` (+ ``.lora_A.weight``) becomes
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight``,
with ``.lora_up.weight`` and a 0-dim float ``.alpha`` (loaders scale by alpha / rank).
U-Net paths keep the diffusers names: right for SD1.x; SDXL files for WebUI/ComfyUI need the
original SGM block names (input_blocks/middle_block/output_blocks): `export_lora` renames the
module paths first (`unet_module_name`, from `sgm_names.sgm_module_namer`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping

import torch

from .peft_state import alpha_for, clip_text_path, split_peft_state_dict

KOHYA_PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2")
_PREFIX = re.compile(r"^lora_[a-z0-9]+$")


def kohya_module_name(module_path: str, prefix: str) -> str:
    """``attn1.to_out.0`` under ``lora_unet`` -> ``lora_unet_..._attn1_to_out_0`` (sd-scripts)."""
    if not _PREFIX.match(prefix):
        raise ValueError(f"kohya prefix must look like {KOHYA_PREFIXES}, got {prefix!r}")
    return f"{prefix}_{module_path.replace('.', '_')}"


def _shared_alpha(alphas: dict[str, float]) -> float:
    """The most common alpha (ties: the smallest); every module is exported with it."""
    counts = Counter(alphas.values())
    return max(counts, key=lambda a: (counts[a], -a))


def peft_to_kohya(
    state_dict: Mapping[str, torch.Tensor],
    *,
    prefix: str,
    alpha: float | Mapping[str, float],
) -> dict[str, torch.Tensor]:
    """`get_peft_model_state_dict` output -> sd-scripts keys (lora_down / lora_up / alpha).

    `alpha` is one value for every module or {module path: alpha}. Per-module alphas are written
    as one shared `.alpha` with the ratio alpha_i / shared folded into that module's lora_up: the
    same scale for every loader, and diffusers' kohya converter (0.42) drops per-module alphas.
    Text-encoder prefixes (``lora_te*``) name modules in the original CLIP layout
    (``lora_te_text_model_encoder_...``) also for transformers 5's flattened CLIPTextModel.
    DoRA magnitudes become ``.dora_scale`` [out, 1(, 1, 1)].
    Raises ValueError on keys that are not LoRA A/B weights or DoRA magnitudes.
    """
    pairs = split_peft_state_dict(state_dict)
    alphas = {module: alpha_for(alpha, module) for module in pairs}
    shared = _shared_alpha(alphas)
    out: dict[str, torch.Tensor] = {}
    for module, pair in pairs.items():
        path = clip_text_path(module) if prefix.startswith("lora_te") else module
        name = kohya_module_name(path, prefix)
        if f"{name}.lora_down.weight" in out:
            raise ValueError(f"two LoRA modules map to the same sd-scripts name {name!r}")
        up = pair.up.detach().cpu()
        if alphas[module] != shared:
            up = (up.float() * (alphas[module] / shared)).to(up.dtype)
        out[f"{name}.lora_down.weight"] = pair.down.detach().cpu().contiguous()  # [r, in, ...]
        out[f"{name}.lora_up.weight"] = up.contiguous()  # [out, r, ...]
        out[f"{name}.alpha"] = torch.tensor(shared, dtype=torch.float32)  # 0-dim
        if pair.magnitude is not None:  # DoRA: one magnitude per output, [out, 1, ...] as
            # ComfyUI's weight_decompose reads it on the output axis (peft's DoRA axis)
            out[f"{name}.dora_scale"] = pair.magnitude.detach().cpu().reshape(
                up.shape[0], *[1] * (up.ndim - 1)).contiguous()
    return out
