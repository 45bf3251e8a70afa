"""LoRA file metadata as sd-scripts writes it: ``ss_*`` training keys, ``modelspec.*`` (SAI model
spec) and the ``sshs_*`` hashes that WebUI / sd-webui-additional-networks read.

Hashes follow sd-scripts (library/train_util.py `precalculate_safetensors_hashes`): serialize the
tensors with only the ``ss_*`` metadata, then
  * model hash: sha256 of everything after the header (8-byte length + JSON header),
  * legacy hash: sha256 of the 0x10000 bytes at offset 0x100000, first 8 hex characters
    (files under 1 MiB hash the empty string: "e3b0c442").
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Mapping

import safetensors.torch
import torch

MODELSPEC_VERSION = "1.0.0"
NETWORK_MODULE = "networks.lora"
_PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v", "v": "v", "flow": "flow"}
_RESERVED_PREFIX = "sshs_"


def metadata_value(value: object) -> str:
    """Metadata values are strings: str as is, containers as JSON, everything else via str()."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def stringify_metadata(metadata: Mapping[str, object] | None) -> dict[str, str]:
    """Copy with string values; None values are dropped."""
    out = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings, got {key!r}")
        if value is not None:
            out[key] = metadata_value(value)
    return out


def base_lora_metadata(ranks: Counter, network_alpha: float | None) -> dict[str, str]:
    """What sd-scripts writes even with --no_metadata: module, dim (most common rank), alpha."""
    out = {"ss_network_module": NETWORK_MODULE, "ss_network_dim": str(ranks.most_common(1)[0][0])}
    if network_alpha is not None:
        out["ss_network_alpha"] = str(network_alpha)
    return out


def _resolution_wh(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """int R -> (R, R); (H, W) -> (W, H) as sd-scripts prints width first."""
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(w), int(h)


def _model_name(name_or_path: str) -> str:
    """sd-scripts keeps hub ids and writes only the basename of local paths."""
    if os.path.exists(name_or_path):
        return os.path.basename(os.path.normpath(name_or_path))
    return name_or_path


def build_metadata(
    *,
    network_dim: int,
    network_alpha: float,
    learning_rate: float,
    num_train_images: int,
    steps: int,
    training_started_at: float,
    output_name: str,
    epoch: int = 1,
    training_finished_at: float | None = None,
    mixed_precision: str = "no",
    seed: int | None = None,
    optimizer: str = "",
    lr_scheduler: str = "constant",
    resolution: int | tuple[int, int] = 512,
    sd_model_name: str = "",
    base_model_version: str = "sd_v1",
    architecture: str = "stable-diffusion-v1/lora",
    implementation: str = "diffusers",
    prediction_type: str = "epsilon",
    title: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, str]:
    """sd-scripts ``ss_*`` + ``modelspec.*`` metadata, all values strings.

    Times are unix seconds (``ss_training_finished_at`` defaults to now). `extra` adds or
    overrides items (the objective's hyper-parameters: ``ss_objective``, ``ss_objective_beta``...);
    ``sshs_*`` keys are reserved for the hashes that the export computes.
    """
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; use one of {list(_PREDICTION_TYPES)}"
        )
    finished = time.time() if training_finished_at is None else training_finished_at
    width, height = _resolution_wh(resolution)
    metadata = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_base_model_version": base_model_version,
        "ss_learning_rate": learning_rate,
        "ss_num_train_images": num_train_images,
        "ss_steps": steps,
        "ss_epoch": epoch,
        "ss_training_started_at": training_started_at,
        "ss_training_finished_at": finished,
        "ss_output_name": output_name,
        "ss_mixed_precision": mixed_precision,
        "ss_seed": seed,
        "ss_optimizer": optimizer,
        "ss_lr_scheduler": lr_scheduler,
        "ss_resolution": f"({width}, {height})",
        "ss_sd_model_name": _model_name(sd_model_name),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title or output_name,
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished)).isoformat(),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": _PREDICTION_TYPES[prediction_type],
    }
    extra = stringify_metadata(extra)
    reserved = sorted(k for k in extra if k.startswith(_RESERVED_PREFIX))
    if reserved:
        raise ValueError(f"metadata keys {reserved} are reserved: the export computes the hashes")
    metadata.update(extra)
    return stringify_metadata(metadata)


def addnet_hash_safetensors(data: bytes) -> str:
    """sha256 hex of the tensor data: the bytes after the 8-byte length and the JSON header."""
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_len:]).hexdigest()


def addnet_hash_legacy(data: bytes) -> str:
    """First 8 hex chars of the sha256 of the 0x10000 bytes at offset 0x100000."""
    return hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]


def sd_scripts_hashes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of `tensors` saved with only the ``ss_*`` metadata."""
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(dict(tensors), training_only)
    return addnet_hash_safetensors(data), addnet_hash_legacy(data)


def with_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """Copy of `metadata` with ``sshs_model_hash`` and ``sshs_legacy_hash`` set."""
    model_hash, legacy_hash = sd_scripts_hashes(tensors, metadata)
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
