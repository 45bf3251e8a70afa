"""Wan2.1 LoRA export with the original Wan module names (what ComfyUI and diffusers load).

Two layouts, both read by ``WanPipeline.load_lora_weights`` (diffusers'
``_convert_non_diffusers_wan_lora_to_diffusers`` / ``_convert_musubi_wan_lora_to_diffusers``):

- ``"wan"`` (default): ``diffusion_model.blocks.N.self_attn.q.lora_A.weight`` / ``.lora_B.weight``.
  The format has no alpha (loaders use scale 1), so alpha / rank is folded into lora_B. ComfyUI
  loads it natively; any subset of the mapped layers is accepted.
- ``"musubi"`` (musubi-tuner): ``lora_unet_blocks_N_self_attn_q.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``. diffusers' musubi converter requires, in every block, the
  self- and cross-attention q/k/v/o and the FFN (``ffn_0``, ``ffn_2``), and nothing else: train
  with network_target_modules covering to_q, to_k, to_v, to_out.0, ffn.net.0.proj, ffn.net.2.

Diffusers names (``attn1.to_q``) are never written: ComfyUI refuses them for Wan.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from .lora import save_lora_file, state_and_alphas
from .peft_state import alpha_for, split_peft_state_dict

WAN_LORA_FORMATS = ("wan", "musubi")
WAN_PREFIX = "diffusion_model."
MUSUBI_PREFIX = "lora_unet_"

# diffusers WanTransformer3DModel module -> original Wan module: the inverse of diffusers'
# _convert_non_diffusers_wan_lora_to_diffusers (loaders/lora_conversion_utils.py)
_BLOCK_MODULES = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
_TOP_MODULES = {
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
}
_BLOCK = re.compile(r"^blocks\.(?P<index>\d+)\.(?P<rest>.+)$")
# the modules diffusers' musubi converter reads in each block (i2v k_img / v_img optional)
_MUSUBI_BLOCK_MODULES = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                         "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
                         "ffn.0", "ffn.2")


def wan_module_name(diffusers_module: str) -> str:
    """``blocks.3.attn1.to_q`` -> ``blocks.3.self_attn.q`` (the original Wan module path)."""
    match = _BLOCK.match(diffusers_module)
    if match and match["rest"] in _BLOCK_MODULES:
        return f"blocks.{match['index']}.{_BLOCK_MODULES[match['rest']]}"
    if diffusers_module in _TOP_MODULES:
        return _TOP_MODULES[diffusers_module]
    raise ValueError(
        f"LoRA module {diffusers_module!r} has no original Wan name; target only attention "
        f"(to_q, to_k, to_v, to_out.0) and FFN (ffn.net.0.proj, ffn.net.2) layers")


def musubi_module_name(wan_module: str) -> str:
    """``blocks.3.self_attn.q`` -> ``lora_unet_blocks_3_self_attn_q`` (musubi-tuner / sd-scripts)."""
    return MUSUBI_PREFIX + wan_module.replace(".", "_")


def _check_musubi_complete(wan_pairs: Mapping[str, object]) -> None:
    """Every block from 0 to the last holds the attention and FFN modules, and nothing else is there
    (diffusers' _convert_musubi_wan_lora_to_diffusers pops exactly these keys)."""
    blocks = sorted({int(m.split(".")[1]) for m in wan_pairs if m.startswith("blocks.")})
    extra = sorted(m for m in wan_pairs if not m.startswith("blocks.")
                   or m.split(".", 2)[2] not in (*_MUSUBI_BLOCK_MODULES, "cross_attn.k_img",
                                                 "cross_attn.v_img"))
    if extra:
        raise ValueError(f"lora_format 'musubi' holds only block attention and FFN layers, not "
                         f"{extra[0]}; use lora_format 'wan'")
    expected = range(blocks[-1] + 1) if blocks else range(0)
    missing = [f"blocks.{i}.{m}" for i in expected for m in _MUSUBI_BLOCK_MODULES
               if f"blocks.{i}.{m}" not in wan_pairs]
    if missing or list(expected) != blocks:
        first = missing[0] if missing else f"block {sorted(set(expected) - set(blocks))[0]}"
        raise ValueError(f"lora_format 'musubi' needs LoRA on the attention and FFN of every block; "
                         f"{first} has none (see network_target_modules)")


def peft_to_wan(state: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float]
                ) -> dict[str, torch.Tensor]:
    """PEFT LoRA of a WanTransformer3DModel -> ``diffusion_model.<wan module>.lora_A/B.weight``
    with ``lora_B * alpha / rank`` (the format has no alpha)."""
    out = {}
    for module, pair in split_peft_state_dict(state).items():
        scale = alpha_for(alpha, module) / pair.rank
        name = WAN_PREFIX + wan_module_name(module)
        out[f"{name}.lora_A.weight"] = pair.down.detach().cpu().contiguous()
        out[f"{name}.lora_B.weight"] = (pair.up.detach().cpu() * scale).contiguous()
    return out


def peft_to_musubi(state: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float]
                   ) -> dict[str, torch.Tensor]:
    """PEFT LoRA of a WanTransformer3DModel -> ``lora_unet_<wan module with _>.lora_down/up.weight``
    and ``.alpha`` (0-dim); every block must carry attention and FFN LoRA."""
    pairs = split_peft_state_dict(state)
    wan_pairs = {wan_module_name(module): (module, pair) for module, pair in pairs.items()}
    _check_musubi_complete(wan_pairs)
    out = {}
    for wan_module, (module, pair) in wan_pairs.items():
        name = musubi_module_name(wan_module)
        out[f"{name}.lora_down.weight"] = pair.down.detach().cpu().contiguous()
        out[f"{name}.lora_up.weight"] = pair.up.detach().cpu().contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha_for(alpha, module), dtype=pair.down.dtype)
    return out


def export_wan_lora(
    path: str | os.PathLike,
    *,
    transformer: torch.nn.Module | Mapping[str, torch.Tensor],
    network_alpha: float | None,
    format: str = "wan",
    metadata: Mapping[str, object] | None = None,
    save_dtype: torch.dtype | None = None,
) -> Path:
    """Write the LoRA of a Wan transformer (PEFT-injected module or its PEFT state dict) atomically
    to `path` (a ``.safetensors`` file) in the "wan" or "musubi" layout; returns the file."""
    if format not in WAN_LORA_FORMATS:
        raise ValueError(f"unknown Wan LoRA format {format!r}; choose one of {WAN_LORA_FORMATS}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"Wan LoRA path must end with .safetensors, got {path}")
    state, alphas = state_and_alphas(transformer, network_alpha)
    tensors = peft_to_wan(state, alphas) if format == "wan" else peft_to_musubi(state, alphas)
    ranks = Counter(pair.rank for pair in split_peft_state_dict(state).values())
    return save_lora_file(path, tensors, ranks, network_alpha=network_alpha, metadata=metadata,
                          save_dtype=save_dtype, hashes=True)
