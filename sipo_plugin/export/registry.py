"""LoRA writers keyed by (family, lora_format): how a trained model's LoRA becomes the file its
users' tools load.

A writer takes the modules that carry the trained LoRA by the component name the files use
(``ModelAdapter.lora_components()``: ``unet``, ``text_encoder``, ``text_encoder_2``,
``transformer``) and writes one file atomically:

    writer(path, components, *, network_alpha, metadata, save_dtype) -> the file written

The built-in families' writers are in the table below; a plugin family adds its own with
`register_lora_writer`. The formats a family accepts in a preset are declared, torch-free, in
`sipo_plugin.models.families` (tests/test_export_registry.py checks the two agree).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..models.families import FAMILIES
from .cogvideox import export_cogvideox_lora
from .lora import export_lora, safetensors_file
from .sgm_names import sgm_module_namer
from .wan import export_wan_lora

Components = Mapping[str, torch.nn.Module]
LoraWriter = Callable[..., Path]  # (path, components, *, network_alpha, metadata, save_dtype)


def write_sd_lora(path: str | os.PathLike, components: Components, *, lora_format: str,
                  sgm_names: bool = False, **options) -> Path:
    """SD1.x / SDXL: the U-Net and the trained text encoders (`export_lora`); ``sgm_names``:
    SDXL's kohya files name U-Net modules with the original SGM blocks."""
    namer = sgm_module_namer(components["unet"].config) if sgm_names else None
    return export_lora(path, **components, format=lora_format, unet_module_name=namer, **options)


def write_cogvideox_lora(path: str | os.PathLike, components: Components, **options) -> Path:
    return export_cogvideox_lora(path, components["transformer"], **options)


def write_wan_lora(path: str | os.PathLike, components: Components, *, lora_format: str,
                   **options) -> Path:
    return export_wan_lora(safetensors_file(path), transformer=components["transformer"],
                           format=lora_format, **options)


_WRITERS: dict[tuple[str, str], LoraWriter] = {
    ("sd15", "kohya"): functools.partial(write_sd_lora, lora_format="kohya"),
    ("sd15", "diffusers"): functools.partial(write_sd_lora, lora_format="diffusers"),
    ("sdxl", "kohya"): functools.partial(write_sd_lora, lora_format="kohya", sgm_names=True),
    ("sdxl", "diffusers"): functools.partial(write_sd_lora, lora_format="diffusers"),
    ("cogvideox", "diffusers"): write_cogvideox_lora,
    ("wan", "wan"): functools.partial(write_wan_lora, lora_format="wan"),
    ("wan", "musubi"): functools.partial(write_wan_lora, lora_format="musubi"),
}


def register_lora_writer(family: str, lora_format: str, writer: LoraWriter) -> None:
    """Add the writer of ``family``'s LoRA in ``lora_format`` (a plugin family's own)."""
    if (family, lora_format) in _WRITERS:
        raise ValueError(f"a LoRA writer for ({family!r}, {lora_format!r}) is already registered")
    _WRITERS[family, lora_format] = writer


def lora_formats_of(family: str) -> tuple[str, ...]:
    """The formats a family's LoRA can be written in, in registration order."""
    return tuple(fmt for fam, fmt in _WRITERS if fam == family)


def lora_writer(family: str, lora_format: str) -> LoraWriter:
    """The writer of (family, lora_format); ValueError (one line) naming the family's formats."""
    if (family, lora_format) not in _WRITERS:
        formats = lora_formats_of(family)
        name = FAMILIES[family].display_name if family in FAMILIES else family
        raise ValueError(f"lora_format '{lora_format}' is not a {name} LoRA format; use "
                         + (" or ".join(repr(f) for f in formats) if formats else
                            "a registered family"))
    return _WRITERS[family, lora_format]


def write_lora(family: str, lora_format: str, path: str | os.PathLike, components: Components, *,
               network_alpha: float | None, metadata: Mapping[str, object] | None = None,
               save_dtype: torch.dtype | None = None) -> Path:
    """Write ``components``' LoRA with the (family, lora_format) writer; returns the file."""
    return lora_writer(family, lora_format)(path, components, network_alpha=network_alpha,
                                            metadata=metadata, save_dtype=save_dtype)
