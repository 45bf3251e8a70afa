"""Small shared helpers (atomic file writes; seeding in utils.seeding)."""

from .io import AtomicWriteError, atomic_write_bytes, atomic_write_text, save_safetensors_atomic

__all__ = ["AtomicWriteError", "atomic_write_bytes", "atomic_write_text", "save_safetensors_atomic"]
