"""Load the bundled toy pipeline and sample images from it, deterministically per (prompt, seed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from .registration import TOY_MODEL_DIR

DEFAULT_GUIDANCE = 2.0
DEFAULT_STEPS = 20


def load_toy_pipeline(path: str | Path | None = None, *, device: str | torch.device = "cpu",
                      ) -> StableDiffusionPipeline:
    """The bundled (or a `pretrain`-written) toy pipeline, fp32, no safety checker."""
    folder = Path(TOY_MODEL_DIR if path is None else path)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no diffusers pipeline at {folder} (model_index.json missing); "
            "build one with `python -m sipo_plugin.toy.pretrain --out DIR`"
        )
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sampling_view(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """The same modules (LoRA adapters included) behind a DDIM scheduler; `pipe` is untouched."""
    components = dict(pipe.components)
    components["scheduler"] = DDIMScheduler.from_config(
        pipe.scheduler.config, set_alpha_to_one=False, timestep_spacing="trailing"
    )
    components.update(safety_checker=None, feature_extractor=None)
    view = StableDiffusionPipeline(**components, requires_safety_checker=False)
    view.set_progress_bar_config(disable=True)
    return view


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [..., 3] in [0, 1] -> np.uint8."""
    return np.clip(np.rint(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


def sample_images(pipe: StableDiffusionPipeline, prompts: Sequence[str], seeds: Sequence[int], *,
                  num_inference_steps: int = DEFAULT_STEPS,
                  guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 64,
                  **pipeline_kwargs) -> np.ndarray:
    """One image per (prompt, seed) -> np.uint8 [N, H, W, 3].

    Each image's initial noise comes from its own CPU `torch.Generator(seed)`, so an image does
    not depend on the batch it is drawn in. Uses the pipeline's own __call__ with DDIM
    (``pipeline_kwargs``: more of its arguments, e.g. clip_skip).
    """
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    view = sampling_view(pipe)
    size = view.unet.config.sample_size * view.vae_scale_factor
    chunks = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch_size]]
        out = view(
            prompt=prompts[i : i + batch_size], generator=gens, height=size, width=size,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            output_type="np", **pipeline_kwargs,
        )
        chunks.append(to_uint8(out.images))
    if not chunks:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.concatenate(chunks)
