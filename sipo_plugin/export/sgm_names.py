"""diffusers U-Net module paths -> the original SGM/LDM names that SDXL LoRA files use.

sd-scripts trains SDXL on its own copy of the original (SGM) U-Net, so WebUI and ComfyUI expect
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` where diffusers says
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``. The layout follows from the U-Net
config (L = layers_per_block, N = len(block_out_channels)):

    input_blocks.0.0                    conv_in
    input_blocks.k, k = 1 + b(L+1) + j  down block b, layer j: .0 resnet, .1 transformer
    input_blocks.1 + b(L+1) + L .0.op   down block b's downsampler (b < N-1)
    middle_block.0 / .1 / .2            mid resnet 0, transformer, resnet 1
    output_blocks.k, k = b(L+1) + j     up block b, layer j (j <= L): .0 resnet, .1 transformer,
                                        upsampler at j = L: .2.conv (.1.conv without attention)

which is also what diffusers' loader inverts (`_maybe_map_sgm_blocks_to_diffusers`). Inside a
transformer the names are the same in both layouts; resnets rename their layers (conv1 ->
in_layers.2, ...), as in sd-scripts' `library/sdxl_model_util.py`.
"""

from __future__ import annotations

import functools
from typing import Callable

# diffusers -> SGM names of the layers inside one resnet block.
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0",
              "conv_out": "out.2"}
_DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")


def _config_value(config, name: str):
    return config[name] if isinstance(config, dict) else getattr(config, name)


def sgm_block_prefixes(config) -> dict[str, str]:
    """{diffusers prefix: SGM prefix} for every block-level submodule of a UNet2DConditionModel
    config (a diffusers config object or dict). Resnet entries end in a resnet; their inner layers
    are renamed by `sgm_unet_module_path`."""
    layers = _config_value(config, "layers_per_block")
    if not isinstance(layers, int):
        raise ValueError(f"SGM names need an int layers_per_block, got {layers!r}")
    down_types = tuple(_config_value(config, "down_block_types"))
    up_types = tuple(_config_value(config, "up_block_types"))
    mid_type = _config_value(config, "mid_block_type")
    unknown = [t for t in down_types if t not in _DOWN_TYPES] + [t for t in up_types if t not in _UP_TYPES]
    if mid_type != "UNetMidBlock2DCrossAttn":
        unknown.append(mid_type)
    if unknown:
        raise ValueError(f"no SGM layout for U-Net blocks {unknown}")
    num_blocks = len(down_types)
    prefixes = dict(_TOP_LEVEL)
    prefixes.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                     "mid_block.resnets.1": "middle_block.2"})
    for b, block_type in enumerate(down_types):
        for j in range(layers):
            k = 1 + b * (layers + 1) + j
            prefixes[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{k}.0"
            if block_type.startswith("CrossAttn"):
                prefixes[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{k}.1"
        if b < num_blocks - 1:
            k = 1 + b * (layers + 1) + layers
            prefixes[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
    for b, block_type in enumerate(up_types):
        attention = block_type.startswith("CrossAttn")
        for j in range(layers + 1):
            k = b * (layers + 1) + j
            prefixes[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{k}.0"
            if attention:
                prefixes[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{k}.1"
        if b < num_blocks - 1:
            k = b * (layers + 1) + layers
            slot = 2 if attention else 1  # after the resnet (and the transformer)
            prefixes[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{k}.{slot}.conv"
    return prefixes


def sgm_unet_module_path(path: str, prefixes: dict[str, str]) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` (for SDXL's prefixes).

    The longest matching diffusers prefix is replaced; a path inside a resnet also renames the
    resnet's layer. Raises ValueError for a path outside the mapped modules."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            rest = parts[cut:]
            if ".resnets." in f".{head}." and rest:
                if rest[0] not in _RESNET:
                    break
                rest = [_RESNET[rest[0]], *rest[1:]]
            return ".".join([prefixes[head], *rest])
    raise ValueError(f"U-Net module {path!r} has no SGM name (supported: modules in the down/mid/up "
                     "blocks, conv_in/out, time and added-condition embeddings)")


def sgm_module_namer(config) -> Callable[[str], str]:
    """The diffusers -> SGM path function for one U-Net config (what `export_lora` takes)."""
    return functools.partial(sgm_unet_module_path, prefixes=sgm_block_prefixes(config))
