"""Tiny reward models saved in their real file layouts (offline, CPU, a second each).

    save_tiny_pickscore(folder)    PickScore_v1's layout: CLIPModel config.json + model.safetensors,
                                   the CLIP processor files beside them (or in processor/)
    save_tiny_clip(folder)         any transformers CLIP folder (the same files)
    save_tiny_aesthetic(folder)    the aesthetic predictor's head (.pth or .safetensors, the published
                                   key layout) with clip/ beside it

The CLIP is random: 2-layer text and vision towers of width 32, 32x32 images in 8x8 patches,
16-value projections, over the tests' tiny byte-level tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from tiny_models import fixed_rng, tiny_clip_config, tiny_clip_tokenizer

PROJECTION_DIM = 16
IMAGE_SIZE = 32
# The published heads' Linear indices; sizes scaled down from 768-1024-128-64-16-1.
HEAD_INDICES = {"linear": (0, 2, 4, 6, 7), "relu": (0, 3, 6, 9, 11)}
HEAD_SIZES = (PROJECTION_DIM, 24, 12, 8, 4, 1)


def tiny_clip_model(seed: int = 0) -> CLIPModel:
    tokenizer = tiny_clip_tokenizer()
    text = tiny_clip_config(tokenizer).to_dict()
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=8)
    with fixed_rng(seed):
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision,
                                     projection_dim=PROJECTION_DIM, logit_scale_init_value=2.0))
    return model.eval()


def save_clip_processor(folder: str | Path) -> Path:
    """preprocessor_config.json + tokenizer files, as a CLIP model's repository has them."""
    folder = Path(folder)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    tiny_clip_tokenizer().save_pretrained(folder)
    return folder


def save_tiny_pickscore(folder: str | Path, seed: int = 0, processor_subfolder: bool = False
                        ) -> Path:
    """A tiny random CLIP in PickScore_v1's folder layout; returns the folder."""
    folder = Path(folder)
    tiny_clip_model(seed).save_pretrained(folder)
    save_clip_processor(folder / "processor" if processor_subfolder else folder)
    return folder


save_tiny_clip = save_tiny_pickscore


def tiny_head_state(layout: str = "linear", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random aesthetic head in the published key layout (``layers.N.weight`` / ``.bias``)."""
    state = {}
    with fixed_rng(seed):
        for index, (n_in, n_out) in zip(HEAD_INDICES[layout], zip(HEAD_SIZES, HEAD_SIZES[1:])):
            state[f"layers.{index}.weight"] = torch.randn(n_out, n_in) / n_in ** 0.5
            state[f"layers.{index}.bias"] = torch.randn(n_out) * 0.1
    return state


def save_tiny_aesthetic(folder: str | Path, layout: str = "linear", suffix: str = ".pth",
                        seed: int = 0) -> Path:
    """``folder/head<suffix>`` (torch.save of a plain state dict, or safetensors) + ``folder/clip/``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = tiny_head_state(layout, seed)
    head = folder / f"head-{layout}{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(head))
    else:
        torch.save(state, head)
    save_tiny_clip(folder / "clip", seed=seed)
    return folder
