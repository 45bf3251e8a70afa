"""One way LoRA gets into a model: peft's own `inject_adapter_in_model`, for every module.

The U-Net, the video transformers and the text encoders all take their LoRA through
``peft.inject_adapter_in_model`` and switch it through peft's tuner layers, never through the
diffusers or transformers PEFT integrations (``model.add_adapter``): transformers 5.24's
integration demands a peft newer than any registry serves, and the two integrations differ in
how they name, enable and list adapters. What peft injects is what both loaders read back.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

TRAINED_ADAPTER = "default"  # peft's default name: get_peft_model_state_dict(model) reads it


def inject_lora(module: torch.nn.Module, config: LoraConfig,
                adapter_name: str = TRAINED_ADAPTER) -> torch.nn.Module:
    """Inject ``config``'s LoRA layers into ``module`` in place (the first injected adapter stays
    the active one when a second is added)."""
    return inject_adapter_in_model(config, module, adapter_name=adapter_name)


def lora_layers(module: torch.nn.Module) -> list[BaseTunerLayer]:
    """Every peft tuner layer inside ``module``."""
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def set_lora_enabled(module: torch.nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer of ``module`` on (the active adapter trains) or off (the base
    weights alone; |difference| to the base = 0)."""
    for layer in lora_layers(module):
        layer.enable_adapters(enabled)


def set_active_lora(module: torch.nn.Module, adapter_name: str, *, trainable: bool) -> None:
    """Make ``adapter_name`` the one active adapter of every LoRA layer of ``module``; its weights
    require grad only when ``trainable`` (peft's ``set_adapter`` with ``inference_mode``)."""
    for layer in lora_layers(module):
        layer.set_adapter(adapter_name, inference_mode=not trainable)


def lora_config(*, rank: int, alpha: float, targets: list[str], use_dora: bool = False,
                rank_pattern: dict | None = None, alpha_pattern: dict | None = None) -> LoraConfig:
    """The LoraConfig every family injects: kaiming-uniform down, zero up (sd-scripts' init: the
    fresh LoRA changes nothing), optional per-module ranks / alphas (LoCon's conv layers) and DoRA."""
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(targets),
                      use_dora=use_dora, rank_pattern=dict(rank_pattern or {}),
                      alpha_pattern=dict(alpha_pattern or {}))
