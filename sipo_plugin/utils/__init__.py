"""Small shared helpers (atomic file writes; seeding in utils.seeding; entry-point plugins and the
built-in registrations in utils.plugins).

Names load from `io` on first use: `plugins` is torch-free and the config checks import it.
"""

from __future__ import annotations

import importlib

__all__ = ["AtomicWriteError", "atomic_write_bytes", "atomic_write_text", "save_safetensors_atomic"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.io"), name)
    globals()[name] = value
    return value
