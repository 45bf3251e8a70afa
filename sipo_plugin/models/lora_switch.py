"""Switching the trained LoRA: on, off (the reference is the base weights) or another adapter
(the starting LoRA as reference), on the peft layers found once per module."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .peft_lora import TRAINED_ADAPTER, lora_layers


class LoraSwitch:
    """Mixin of ModelAdapter: needs ``trainable_modules()``, ``finetune`` and
    ``reference_adapter``."""

    def set_adapters_enabled(self, enabled: bool) -> None:
        """Switch the LoRA on or off in every trainable module (peft's ``enable_adapters`` on each
        LoRA layer; off: the base weights alone), on the layers found once per module (finding
        them walks every submodule: ms on a large denoiser, twice a step)."""
        for module in self.trainable_modules():
            for layer in self.lora_layers(module):
                layer.enable_adapters(enabled)

    def lora_layers(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        """The peft tuner layers inside ``module``, found on first use (memo per module)."""
        memo = self.__dict__.setdefault("_lora_layers", {})
        hit = memo.get(id(module))
        if hit is None or hit[0] is not module:
            hit = memo[id(module)] = (module, lora_layers(module))
        return hit[1]

    def forget_lora_layers(self) -> None:
        """New peft layers were injected: find them again on the next switch."""
        self.__dict__.pop("_lora_layers", None)

    def set_active_adapter(self, name: str) -> None:
        """Make adapter ``name`` the active one (only the trained adapter requires grad)."""
        raise NotImplementedError(f"{type(self).__name__} has one adapter only")

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The reference model is the same weights with the adapter disabled (no second copy), or,
        with ``reference_adapter``, with that frozen adapter active instead of the trained one."""
        if self.finetune == "full":
            raise RuntimeError("full fine-tuning has no adapter to switch off: the reference is a "
                               "frozen copy or cached errors (sipo_plugin.training.reference)")
        if self.reference_adapter:
            self.set_active_adapter(self.reference_adapter)
            try:
                yield
            finally:
                self.set_active_adapter(TRAINED_ADAPTER)
            return
        self.set_adapters_enabled(False)
        try:
            yield
        finally:
            self.set_adapters_enabled(True)
