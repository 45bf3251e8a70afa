"""Entry-point plugins: load every object of a group, warn about (and skip) the broken ones."""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from collections.abc import Callable
from typing import Any


def load_entry_points(group: str, adopt: Callable[[Any], None], kind: str) -> None:
    """``adopt(entry_point.load())`` for every entry point of ``group``; one that fails to load or
    to be adopted becomes a RuntimeWarning naming the ``kind`` of plugin, so it cannot hide the
    built-ins."""
    for entry_point in importlib.metadata.entry_points(group=group):
        try:
            adopt(entry_point.load())
        except Exception as exc:  # noqa: BLE001 - any failure of third-party code
            warnings.warn(f"skipping {kind} plugin {entry_point.name!r} ({entry_point.value}): "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)


# torch-free modules that register names a preset may use instead of a path (the toy world's "toy"
# model and prompt set); third-party packages add theirs through the entry-point group below
BUILTIN_REGISTRATIONS = ("sipo_plugin.toy.registration",)
REGISTRATIONS_GROUP = "sipo_plugin.registrations"
_registered = False


def load_registrations() -> None:
    """Import the built-in registration modules and call every ``sipo_plugin.registrations``
    entry point, once (the registries call this before a lookup)."""
    global _registered
    if _registered:
        return
    _registered = True
    for module in BUILTIN_REGISTRATIONS:
        importlib.import_module(module)
    load_entry_points(REGISTRATIONS_GROUP, lambda register: register(), "registration")
