"""The LoRA a run trains, on the U-Net and the text encoders: fresh (LoRA, LoCon, DoRA) or
started from an existing file (``network_weights``).

LoCon follows sd-scripts' networks/lora.py: with ``conv_dim``, every Linear and Conv2d inside the
U-Net's ResnetBlock2D, Downsample2D and Upsample2D modules is wrapped too, the 3x3 convolutions at
rank conv_dim / alpha conv_alpha, the 1x1 convolutions and linears (conv_shortcut, time_emb_proj) at
network_dim / network_alpha. peft takes the per-module ranks as ``rank_pattern`` / ``alpha_pattern``
(keys are escaped full module paths, so each matches its own module only).

A file's modules are found by name: every Linear / Conv2d of the model is named the way each
layout names it (sd-scripts: ``lora_unet_`` + path with ``_``, SDXL's original SGM block names;
diffusers: the module path, CLIP's ``text_model.`` level restored), and each file module must be
one of them with matching shapes. The injected adapter gets the file's rank, alpha and DoRA
magnitudes per module; with ``reference = "initial"`` a second, frozen adapter holds the same
weights (OneTrainer's EXISTING_ADAPTER reference).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from ..export.kohya import kohya_module_name
from ..export.lora_file import LoraFileError, LoraModule, load_lora_modules, summarize_lora_file
from ..export.peft_state import clip_text_path
from .peft_lora import TRAINED_ADAPTER, inject_lora, lora_config, set_active_lora

LOCON_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # sd-scripts' conv targets
KOHYA_PREFIXES = {"unet": ("lora_unet",), "text_encoder": ("lora_te", "lora_te1"),
                  "text_encoder_2": ("lora_te2",)}


def is_conv3x3(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def locon_modules(unet: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(every Linear / Conv2d path inside the U-Net's ResNet and sampler blocks, the 3x3 ones)."""
    paths, convs = [], []
    for block_path, block in unet.named_modules():
        if type(block).__name__ not in LOCON_BLOCKS:
            continue
        for child_path, child in block.named_modules():
            if child_path and isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                paths.append(f"{block_path}.{child_path}")
                if is_conv3x3(child):
                    convs.append(paths[-1])
    return paths, convs


def fresh_lora_config(network, unet: torch.nn.Module | None = None):
    """The U-Net's LoraConfig: network_target_modules at network_dim / network_alpha, plus (LoCon,
    conv_dim > 0) the ResNet/sampler layers, their 3x3 convolutions at conv_dim / conv_alpha."""
    targets = list(network.network_target_modules)
    ranks, alphas = {}, {}
    if unet is not None and network.conv_dim:
        paths, convs = locon_modules(unet)
        targets = sorted({*_matching_paths(unet, targets), *paths})
        ranks = {re.escape(p): network.conv_dim for p in convs}
        alphas = {re.escape(p): network.conv_alpha for p in convs}
    return lora_config(rank=network.network_dim, alpha=network.network_alpha, targets=targets,
                       use_dora=network.use_dora, rank_pattern=ranks, alpha_pattern=alphas)


def _matching_paths(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Full paths of the modules peft's ``target_modules = names`` would wrap (path equal to a
    name or ending in ``.name``)."""
    return [p for p, _ in model.named_modules()
            if p and any(p == n or p.endswith("." + n) for n in names)]


# -- starting from a file ----------------------------------------------------------------------

def module_index(model: torch.nn.Module, component: str, layout: str,
                 unet_namer: Callable[[str], str] | None = None) -> dict[str, str]:
    """{name in a LoRA file of ``layout``: module path} for every Linear / Conv2d of ``model``."""
    index = {}
    for path, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        canonical = clip_text_path(path) if component.startswith("text_encoder") else path
        if layout == "diffusers":
            index[canonical] = path
            continue
        names = [canonical]
        if unet_namer is not None:
            try:
                names.append(unet_namer(path))  # SDXL: the SGM block names sd-scripts writes
            except ValueError:
                pass
        for prefix in KOHYA_PREFIXES[component]:
            for name in names:
                index[kohya_module_name(name, prefix)] = path
    return index


def _checked(file: Path, name: str, module: torch.nn.Module, lora: LoraModule) -> LoraModule:
    """``lora`` when its shapes fit ``module``, else a LoraFileError naming both."""
    if isinstance(module, torch.nn.Linear):
        down, up = (lora.rank, module.in_features), (module.out_features, lora.rank)
        magnitude = (module.out_features,)
    else:
        down = (lora.rank, module.in_channels, *module.kernel_size)
        up, magnitude = (module.out_channels, lora.rank, 1, 1), (module.out_channels,)
    if tuple(lora.down.shape) != down or tuple(lora.up.shape) != up:
        raise LoraFileError(
            f"network_weights {file}: '{name}' has lora_down {tuple(lora.down.shape)} / lora_up "
            f"{tuple(lora.up.shape)}, the model's layer needs {down} / {up} (a LoRA for another "
            "base model or rank layout?)")
    out = magnitude[0]
    output_axis = {(out,), (out, 1), (out, 1, 1, 1), (1, out, 1, 1)}  # kohya / peft layouts
    if lora.magnitude is not None and tuple(lora.magnitude.shape) not in output_axis:
        raise LoraFileError(
            f"network_weights {file}: '{name}' has a DoRA scale of shape "
            f"{tuple(lora.magnitude.shape)}, not one value per output of its {out} (DoRA on the "
            "input axis, LyCORIS wd_on_out = false, is not supported)")
    return lora


def resolve_file_modules(file: Path, model: torch.nn.Module, component: str, layout: str,
                         modules: dict[str, LoraModule], family: str,
                         unet_namer: Callable[[str], str] | None = None) -> dict[str, LoraModule]:
    """{module path: LoraModule} of one component, each file module found in ``model``."""
    index = module_index(model, component, layout, unet_namer)
    resolved = {}
    for name, lora in modules.items():
        path = index.get(name)
        if path is None:
            raise LoraFileError(
                f"network_weights {file}: '{name}' names no layer of this {family} model's "
                f"{component} (a LoRA for another model family or layout?)")
        resolved[path] = _checked(file, name, model.get_submodule(path), lora)
    return resolved


def file_lora_config(modules: dict[str, LoraModule], use_dora: bool):
    """One LoraConfig for a component's file modules: the most common rank and alpha, the others
    as patterns, the exact module paths as targets."""
    ranks = Counter(m.rank for m in modules.values())
    rank = max(ranks, key=lambda r: (ranks[r], -r))
    alphas = Counter(m.alpha for m in modules.values() if m.rank == rank)
    alpha = max(alphas, key=lambda a: (alphas[a], -a))
    return lora_config(
        rank=rank, alpha=alpha, targets=sorted(modules), use_dora=use_dora,
        rank_pattern={re.escape(p): m.rank for p, m in modules.items() if m.rank != rank},
        alpha_pattern={re.escape(p): m.alpha for p, m in modules.items() if m.alpha != alpha})


@torch.no_grad()
def copy_file_weights(model: torch.nn.Module, modules: dict[str, LoraModule], adapter: str) -> None:
    """The file's down / up / DoRA magnitude into ``adapter``'s layers of ``model``."""
    for path, lora in modules.items():
        layer = model.get_submodule(path)
        layer.lora_A[adapter].weight.copy_(lora.down)
        layer.lora_B[adapter].weight.copy_(lora.up)
        if lora.magnitude is not None:
            target = layer.lora_magnitude_vector[adapter].weight
            target.copy_(lora.magnitude.reshape(target.shape))


def inject_from_file(models: dict[str, torch.nn.Module], file: Path, *, family: str,
                     use_dora: bool, adapters: tuple[str, ...] = (TRAINED_ADAPTER,),
                     unet_namer: Callable[[str], str] | None = None) -> list[str]:
    """Inject the LoRA of ``file`` into ``models`` ({component: module}) as each of ``adapters``
    (the first trains; the others are frozen copies); returns the components it found in the file.
    Every module is checked before anything is injected."""
    layout = summarize_lora_file(file).layout
    contents = load_lora_modules(file)
    missing = sorted(set(contents) - set(models))
    if missing:
        raise LoraFileError(f"network_weights {file}: holds LoRA for {', '.join(missing)}, which "
                            f"this {family} model does not have (a LoRA for another model family?)")
    resolved = {component: resolve_file_modules(file, models[component], component, layout,
                                                modules, family,
                                                unet_namer if component == "unet" else None)
                for component, modules in contents.items()}
    for component, modules in resolved.items():
        config = file_lora_config(modules, use_dora)
        for adapter in adapters:
            inject_lora(models[component], config, adapter)
            copy_file_weights(models[component], modules, adapter)
        # peft marks every injected adapter trainable: only the first trains and is active
        set_active_lora(models[component], adapters[0], trainable=True)
    return sorted(resolved)
