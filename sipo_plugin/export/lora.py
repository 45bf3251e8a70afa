"""`export_lora`: the trained LoRA of a U-Net (and text encoder) as one safetensors file."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..utils.io import save_safetensors_atomic
from .diffusers_format import DIFFUSERS_WEIGHT_NAME, peft_to_diffusers
from .kohya import peft_to_kohya
from .metadata import base_lora_metadata, stringify_metadata, with_hashes
from .peft_state import check_alphas, lora_state_of, split_peft_state_dict

LORA_FORMATS = ("kohya", "diffusers")
LoraSource = torch.nn.Module | Mapping[str, torch.Tensor]


def state_and_alphas(
    source: LoraSource, network_alpha: float | None
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A PEFT-injected module or a get_peft_model_state_dict dict -> (state dict, module alphas)."""
    if isinstance(source, torch.nn.Module):
        state, alphas = lora_state_of(source)
        return state, check_alphas(alphas, network_alpha)
    if network_alpha is None:
        raise ValueError("network_alpha is required when exporting a LoRA state dict")
    state = dict(source)
    return state, {module: float(network_alpha) for module in split_peft_state_dict(state)}


def _renamed_modules(state: dict[str, torch.Tensor], alphas: dict[str, float],
                     module_name: Callable[[str], str]) -> tuple[dict, dict]:
    """Rename every LoRA module path with `module_name` (keys ``<module>.lora_A.weight``)."""
    new_state = {}
    for module, pair in split_peft_state_dict(state).items():
        new_state[f"{module_name(module)}.lora_A.weight"] = pair.down
        new_state[f"{module_name(module)}.lora_B.weight"] = pair.up
        if pair.magnitude is not None:
            new_state[f"{module_name(module)}.lora_magnitude_vector"] = pair.magnitude
    return new_state, {module_name(module): alpha for module, alpha in alphas.items()}


def _output_file(path: Path, format: str) -> Path:
    if format == "kohya":
        if path.suffix != ".safetensors":
            raise ValueError(f"kohya LoRA path must end with .safetensors, got {path}")
        return path
    return path if path.suffix == ".safetensors" else path / DIFFUSERS_WEIGHT_NAME


def safetensors_file(path: str | os.PathLike) -> Path:
    """``path`` as a .safetensors file: the suffix is appended to a path without it."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def save_lora_file(path: Path, tensors: dict[str, torch.Tensor], ranks: Counter, *,
                   network_alpha: float | None, metadata: Mapping[str, object] | None,
                   save_dtype: torch.dtype | None, hashes: bool) -> Path:
    """Write a LoRA file atomically: tensors in ``save_dtype`` (None: as they are), the base
    ``ss_*`` keys and ``metadata``; with ``hashes`` (the sd-scripts layouts) the ``sshs_*``
    hashes, else diffusers' ``format: pt``."""
    if save_dtype is not None:
        tensors = {k: v.to(save_dtype) for k, v in tensors.items()}
    meta = {**base_lora_metadata(ranks, network_alpha), **stringify_metadata(metadata)}
    meta = with_hashes(tensors, meta) if hashes else {"format": "pt", **meta}
    return save_safetensors_atomic(tensors, path, meta)


def export_lora(
    path: str | os.PathLike,
    *,
    unet: LoraSource,
    text_encoder: LoraSource | None = None,
    text_encoder_2: LoraSource | None = None,
    network_alpha: float | None,
    format: str = "kohya",
    metadata: Mapping[str, object] | None = None,
    save_dtype: torch.dtype | None = None,
    unet_module_name: Callable[[str], str] | None = None,
) -> Path:
    """Write the LoRA of `unet` (and `text_encoder`) atomically; returns the file written.

    `unet` / `text_encoder`: PEFT-injected modules (``peft.inject_adapter_in_model(LoraConfig(...), unet)``) or their
    `peft.get_peft_model_state_dict` dicts. For modules, every layer's scale must equal
    network_alpha / rank (None: export each module's own alpha).
    format "kohya": sd-scripts keys (lora_unet_*, lora_te_*) + ``.alpha`` at `path` (a
    ``.safetensors`` file), with `metadata` and the ``sshs_*`` hashes.
    format "diffusers": ``unet.<path>.lora_A.weight`` keys with alpha / rank folded into lora_B;
    `path` ending in ``.safetensors`` is that file, anything else is a folder that receives
    ``pytorch_lora_weights.safetensors``. Either loads with ``pipe.load_lora_weights(path)``.
    SDXL: `text_encoder_2` is the second text encoder (kohya prefixes then lora_te1 / lora_te2,
    diffusers components text_encoder / text_encoder_2), and `unet_module_name` maps the U-Net's
    diffusers module paths to the kohya file's names (`sgm_names.sgm_module_namer`); the
    diffusers format always keeps the diffusers paths.
    """
    if format not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {LORA_FORMATS}")
    parts = [("lora_unet", "unet", unet)]
    if text_encoder is not None:
        parts.append(("lora_te" if text_encoder_2 is None else "lora_te1", "text_encoder", text_encoder))
    if text_encoder_2 is not None:
        parts.append(("lora_te2", "text_encoder_2", text_encoder_2))
    tensors: dict[str, torch.Tensor] = {}
    ranks: Counter = Counter()
    for kohya_prefix, component, source in parts:
        state, alphas = state_and_alphas(source, network_alpha)
        ranks.update(pair.rank for pair in split_peft_state_dict(state).values())
        if format == "kohya":
            if component == "unet" and unet_module_name is not None:
                state, alphas = _renamed_modules(state, alphas, unet_module_name)
            tensors.update(peft_to_kohya(state, prefix=kohya_prefix, alpha=alphas))
        else:
            tensors.update(peft_to_diffusers(state, prefix=component, alpha=alphas))
    return save_lora_file(_output_file(Path(path), format), tensors, ranks,
                          network_alpha=network_alpha, metadata=metadata, save_dtype=save_dtype,
                          hashes=format == "kohya")
