"""The model-family registry: family names -> adapter classes (see base.ModelAdapter).

The built-in adapters (sd15, sdxl, cogvideox, wan: the families of ``families.FAMILIES``) import
diffusers, so they load on the first lookup, not at import; each registers itself with
`register_model_family`.
"""

from __future__ import annotations

import importlib
from typing import Callable

from .families import FAMILIES

_FAMILIES: dict[str, type] = {}


def register_model_family(name: str) -> Callable[[type], type]:
    """Class decorator: the adapter class of family ``name`` (sets its ``family``)."""
    def wrap(cls: type) -> type:
        if name in _FAMILIES:
            raise ValueError(f"model family '{name}' is already registered")
        cls.family = name
        _FAMILIES[name] = cls
        return cls
    return wrap


def load_builtin_families() -> None:
    """Import the built-in adapters (each registers itself)."""
    for name in FAMILIES:
        importlib.import_module(f"{__package__}.{name}")


def available_model_families() -> list[str]:
    load_builtin_families()
    return sorted(_FAMILIES)


def get_model_adapter(name: str) -> type:
    """The adapter class of family ``name``; ValueError naming the available ones."""
    load_builtin_families()
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family '{name}'; available: {', '.join(available_model_families())}")
    return _FAMILIES[name]

