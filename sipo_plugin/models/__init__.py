"""Model families behind one adapter interface (see base.ModelAdapter).

The adapters (torch, diffusers) load on first use of this package's API; ``families`` (what the
config checks need to know about each family) imports neither.
"""

from __future__ import annotations

__all__ = ["ModelAdapter", "NoisyBatch", "available_model_families", "get_model_adapter",
           "register_model_family"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import base
    base.load_builtin_families()
    globals().update({key: getattr(base, key) for key in __all__})
    return globals()[name]
