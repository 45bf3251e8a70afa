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
import shutil
import tempfile
from pathlib import Path

METADATA_FILE = "sipo_training.json"


def save_pipeline_atomic(pipeline, path: str | os.PathLike, *, metadata: dict) -> Path:
    """``pipeline.save_pretrained(path)`` (safetensors) so that ``path`` is either the previous
    folder or the complete new one: written beside it, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = None
    if path.exists():  # a directory cannot be replaced in one rename: move the old one aside first
        previous = path.with_name(f".{path.name}.old")
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(path, previous)
    os.replace(staging, path)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return path
