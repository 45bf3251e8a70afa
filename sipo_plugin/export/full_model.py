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

from ..utils.io import atomic_folder

METADATA_FILE = "sipo_training.json"


def save_pipeline_atomic(pipeline, path: str | os.PathLike, *, metadata: dict) -> Path:
    """``pipeline.save_pretrained(path)`` (safetensors) so that ``path`` is either the previous
    folder or the complete new one: written beside it, then renamed into place."""
    with atomic_folder(path) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")
    return Path(path)
