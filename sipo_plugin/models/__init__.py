"""Model families behind one adapter interface (see base.ModelAdapter).

The adapters (torch, diffusers) load on first use of this package's API; ``families`` (what the
config checks need to know about each family) imports neither.
"""

from __future__ import annotations

from ..utils.lazy import lazy_getattr

__all__ = ["ModelAdapter", "NoisyBatch", "available_model_families", "get_model_adapter",
           "register_model_family"]

__getattr__ = lazy_getattr(__name__, dict.fromkeys(__all__, "base"), globals())
