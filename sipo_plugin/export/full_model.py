"""Full fine-tuning export: the trained pipeline as a diffusers folder, replaced atomically.

A diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, weights
as safetensors) is what diffusers' ``from_pretrained`` loads and what sd-scripts accepts as a base
model; diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py`` makes the
single-file checkpoint WebUI and ComfyUI load. The training metadata goes beside it in
``sipo_training.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..utils.io import atomic_folder

METADATA_FILE = "sipo_training.json"


def cast_saved_weights(folder: Path, dtype) -> None:
    """Every floating-point tensor of the safetensors files in ``folder`` stored in ``dtype``
    (one file in memory at a time; the live model keeps its own precision)."""
    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(file)
        save_file({k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in tensors.items()},
                  file, metadata={"format": "pt"})


def save_pipeline_atomic(pipeline, path: str | os.PathLike, *, metadata: dict,
                         save_dtype: dict | None = None) -> Path:
    """``pipeline.save_pretrained(path)`` (safetensors) so that ``path`` is either the previous
    folder or the complete new one: written beside it, then renamed into place. ``save_dtype``
    ({component: dtype or None}) stores those components' weights in that dtype."""
    with atomic_folder(path) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        for component, dtype in (save_dtype or {}).items():
            if dtype is not None:
                cast_saved_weights(staging / component, dtype)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")
    return Path(path)
