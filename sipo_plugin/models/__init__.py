"""Model families behind one adapter interface (see base.ModelAdapter)."""

from .base import ModelAdapter, NoisyBatch, available_model_families, get_model_adapter, register_model_family
from . import sd15  # noqa: F401  (registers "sd15")
from . import sdxl  # noqa: F401  (registers "sdxl")
from . import wan  # noqa: F401  (registers "wan")
from . import cogvideox  # noqa: F401  (registers "cogvideox")

__all__ = ["ModelAdapter", "NoisyBatch", "available_model_families", "get_model_adapter",
           "register_model_family"]
