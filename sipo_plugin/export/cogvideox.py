"""CogVideoX LoRA export in the diffusers layout ``CogVideoXPipeline.load_lora_weights`` reads:
``transformer.<module path>.lora_A.weight`` / ``.lora_B.weight``, alpha / rank folded into B (the
format has no alpha)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from .diffusers_format import peft_to_diffusers
from .lora import save_lora_file, safetensors_file, state_and_alphas
from .peft_state import split_peft_state_dict


def export_cogvideox_lora(path: str | os.PathLike,
                          transformer: torch.nn.Module | Mapping[str, torch.Tensor], *,
                          network_alpha: float | None, metadata: Mapping[str, object] | None = None,
                          save_dtype: torch.dtype | None = None) -> Path:
    """The transformer's PEFT LoRA (the injected module or its PEFT state dict) as one
    .safetensors file ('.safetensors' is appended to a path without it), written atomically."""
    state, alphas = state_and_alphas(transformer, network_alpha)
    tensors = peft_to_diffusers(state, prefix="transformer", alpha=alphas)
    ranks = Counter(pair.rank for pair in split_peft_state_dict(state).values())
    return save_lora_file(safetensors_file(path), tensors, ranks, network_alpha=network_alpha,
                          metadata=metadata, save_dtype=save_dtype, hashes=False)
