"""Training on a candidate's saved latents (``sipo-pairs sample`` keeps the sampler's final latents
beside each image) instead of encoding the decoded image with the VAE again.

A `sipo-pairs make` manifest names them (``chosen_latents`` / ``rejected_latents``). They are used
only when every pair has them and they fit the run: the same model family and base model, sampled
at the run's resolution, and no augmentation that changes the pixels (flip_aug) or the size
(enable_bucket); otherwise the images are encoded as for any other pair data. Video pairs always
encode their clips.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from safetensors import safe_open


def read_latents(path: str | os.PathLike) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("latents")


def latents_metadata(path: str | os.PathLike) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def model_key(name_or_path: str) -> str:
    """A base model's identity for comparison: 'toy', or the absolute path."""
    return name_or_path if name_or_path == "toy" else str(Path(name_or_path).resolve())


def misfit(config, meta: dict) -> str | None:
    """Why latents sampled with ``meta`` (family, model, width, height) cannot train this run."""
    d, m = config.data, config.model
    if d.num_frames:
        return "video pairs encode their clips"
    if d.flip_aug or d.enable_bucket:
        return "flip_aug / enable_bucket change the pixels the latents stand for"
    if meta.get("family") != m.family or meta.get("model") != model_key(m.pretrained_model_name_or_path):
        return f"sampled by {meta.get('family')} {meta.get('model')}, not this run's model"
    if (meta.get("width"), meta.get("height")) != (str(d.resolution), str(d.resolution)):
        return (f"sampled at {meta.get('width')}x{meta.get('height')}, the run trains at "
                f"{d.resolution}x{d.resolution}")
    return None


def use_saved_latents(config, records: list, log=None) -> list:
    """``records`` unchanged when all their saved latents fit the run, else without latents."""
    with_latents = [r for r in records if r.chosen_latents is not None]
    if not with_latents:
        return records
    reason = None if len(with_latents) == len(records) else "only some pairs have saved latents"
    for record in with_latents:
        for path in (record.chosen_latents, record.rejected_latents):
            reason = reason or misfit(config, latents_metadata(path))
        if reason:
            break
    if log is not None:
        log(f"saved latents of {len(records)} pairs used (no VAE encode)" if reason is None
            else f"saved latents not used ({reason}): encoding the images")
    if reason is None:
        return records
    return [dataclasses.replace(r, chosen_latents=None, rejected_latents=None) for r in records]
