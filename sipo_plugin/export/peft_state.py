"""LoRA weights out of PEFT: from a `get_peft_model_state_dict` dict or from live modules."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

_PEFT_KEY = re.compile(
    r"^(?P<module>.+)\.(lora_(?P<which>[AB])\.weight|(?P<magnitude>lora_magnitude_vector)(\.weight)?)$")
_PEFT_MODEL_PREFIX = "base_model.model."
_PIPELINE_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")
# transformers >= 5 flattens CLIPTextModel (no `text_model.` level); LoRA files keep the original
# CLIP layout `text_model.encoder.layers.N...`, which WebUI, ComfyUI and diffusers all expect.
_FLAT_CLIP_ROOTS = ("encoder.", "embeddings.", "final_layer_norm")


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: down = lora_A [r, in, (kh, kw)], up = lora_B [out, r, (1, 1)], and for
    DoRA the magnitude, one value per output [out] (None: plain LoRA)."""

    down: torch.Tensor
    up: torch.Tensor
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def _unmappable(key: str, why: str) -> ValueError:
    return ValueError(
        f"cannot map LoRA key {key!r}: {why}; pass peft.get_peft_model_state_dict(model) of one "
        f"LoRA or DoRA adapter (LoRA bias and embedding LoRA are not supported)"
    )


def split_peft_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, LoraPair]:
    """``<module>.lora_A.weight`` / ``.lora_B.weight`` -> {module path: LoraPair}, sorted."""
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise _unmappable(key, "not a '<module>.lora_A.weight' / '.lora_B.weight' key")
        module = match["module"].removeprefix(_PEFT_MODEL_PREFIX)
        if module.startswith(_PIPELINE_PREFIXES):
            raise _unmappable(key, "pipeline-prefixed (diffusers file layout); strip the prefix")
        if match["magnitude"]:
            magnitudes[module] = tensor.flatten()
            continue
        (downs if match["which"] == "A" else ups)[module] = tensor
    for module in sorted(magnitudes.keys() - downs.keys()):
        raise _unmappable(f"{module}.lora_magnitude_vector", "a DoRA magnitude without its lora_A")
    for module in sorted(downs.keys() ^ ups.keys()):
        have, lack = ("lora_A", "lora_B") if module in downs else ("lora_B", "lora_A")
        raise _unmappable(f"{module}.{have}.weight", f"no matching {lack}")
    pairs = {}
    for module in sorted(downs):
        down, up = downs[module], ups[module]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
            raise _unmappable(
                f"{module}.lora_A.weight",
                f"inconsistent shapes lora_A {tuple(down.shape)}, lora_B {tuple(up.shape)}",
            )
        magnitude = magnitudes.get(module)
        if magnitude is not None and magnitude.numel() != up.shape[0]:
            raise _unmappable(f"{module}.lora_magnitude_vector",
                              f"{magnitude.numel()} magnitudes for {up.shape[0]} outputs")
        pairs[module] = LoraPair(down, up, magnitude)
    if not pairs:
        raise ValueError("empty LoRA state dict: the model has no LoRA layers to export")
    return pairs


def clip_text_path(module_path: str) -> str:
    """Module path in a (possibly flattened) CLIPTextModel -> the canonical ``text_model.`` path."""
    if module_path.startswith(_FLAT_CLIP_ROOTS):
        return "text_model." + module_path
    return module_path


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _active_adapter(layer, name: str) -> str | None:
    adapters = list(layer.active_adapters)
    if len(adapters) != 1:
        raise ValueError(f"{name}: {len(adapters)} active LoRA adapters {adapters}; export one")
    adapter = adapters[0]
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        raise ValueError(f"{name}: LoRA with lora_bias=True cannot be exported as plain LoRA")
    if adapter in getattr(layer, "lora_embedding_A", {}):
        raise ValueError(f"{name}: embedding LoRA is not supported by the sd-scripts format")
    return adapter if adapter in layer.lora_A else None


def lora_state_of(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Live PEFT LoRA layers -> (get_peft_model_state_dict-style dict, {module: effective alpha}).

    The effective alpha is ``scaling * r`` (what an sd-scripts loader needs to reproduce the scale:
    alpha / r), so rsLoRA and per-module alpha_pattern export correctly.
    """
    state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for name, layer in _unwrap(model).named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        adapter = _active_adapter(layer, name)
        if adapter is None:
            continue
        module = name.removeprefix(_PEFT_MODEL_PREFIX)
        state[f"{module}.lora_A.weight"] = layer.lora_A[adapter].weight.detach()
        state[f"{module}.lora_B.weight"] = layer.lora_B[adapter].weight.detach()
        if layer.use_dora.get(adapter, False):
            state[f"{module}.lora_magnitude_vector"] = (
                layer.lora_magnitude_vector[adapter].weight.detach().flatten())
        alphas[module] = float(layer.scaling[adapter]) * layer.r[adapter]
    if not state:
        raise ValueError(f"{type(model).__name__} has no active LoRA layers to export")
    return state, alphas


def alpha_for(alpha: float | Mapping[str, float], module: str) -> float:
    """One alpha for all modules, or the module's entry of a {module path: alpha} mapping."""
    if isinstance(alpha, Mapping):
        if module not in alpha:
            raise ValueError(f"no alpha given for LoRA module {module!r}")
        return float(alpha[module])
    return float(alpha)


def check_alphas(alphas: Mapping[str, float], network_alpha: float | None) -> dict[str, float]:
    """Per-module alphas; with `network_alpha`, check every module uses it and return it exactly."""
    if network_alpha is None:
        return dict(alphas)
    for module, alpha in alphas.items():
        if abs(alpha - network_alpha) > 1e-5 * max(1.0, abs(network_alpha)):
            raise ValueError(
                f"{module}: the model's LoRA scale corresponds to alpha {alpha:g}, not "
                f"network_alpha={network_alpha:g} (check lora_alpha, alpha_pattern, use_rslora); "
                f"pass network_alpha=None to export the model's own alphas"
            )
    return {module: float(network_alpha) for module in alphas}
