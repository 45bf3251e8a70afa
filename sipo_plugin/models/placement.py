"""Where the frozen encoders live: on the training device, or released to the CPU once their
outputs are cached (and brought back for sampling and export)."""

from __future__ import annotations

import contextlib
from typing import Iterator


class EncoderPlacement:
    """Mixin of ModelAdapter: needs ``device``, ``vae`` and ``frozen_encoder_names``."""

    released_encoders: list[str] | tuple = ()  # the names of the encoders now on the CPU

    def release_encoders(self, *, vae: bool, text_encoders: bool) -> list[str]:
        """Move the VAE and/or the frozen text encoders to the CPU once their outputs are cached
        (they stay usable for sampling, see ``encoders_on_device``, and export); returns their
        names."""
        names = (["vae"] if vae else []) + (
            [n for n in self.frozen_encoder_names if getattr(self, n, None) is not None]
            if text_encoders else [])
        # weights already on the CPU (a CPU run, diffusers group offloading) stay where they are
        self.released_encoders = [n for n in names
                                  if next(getattr(self, n).parameters()).device.type != "cpu"]
        for name in self.released_encoders:
            getattr(self, name).to("cpu")
        return names

    def restore_encoders(self) -> None:
        """Released encoders back on the training device (after training: export, evaluation)."""
        for name in self.released_encoders:
            getattr(self, name).to(self.device)
        self.released_encoders = []

    @contextlib.contextmanager
    def encoders_on_device(self) -> Iterator[None]:
        """Released encoders back on the training device for a while (sampling images mid-run)."""
        names = self.released_encoders
        self.restore_encoders()
        try:
            yield
        finally:
            self.released_encoders = names
            for name in names:
                getattr(self, name).to("cpu")
