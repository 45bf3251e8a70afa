"""Sampling images or clips from a model adapter's pipeline, one seed per sample, batched.

The one place where candidates (`sipo-pairs sample`) and evaluation samples (`train_sipo.py
--evaluate`) are drawn: both call `generate`, so base, tuned and candidate samples of the same
(prompt, seed) come from the same code. Each sample's initial noise (and an ancestral sampler's step
noise) comes from its own `torch.Generator(seed)`, so a sample does not depend on the batch it is
drawn in. The final latents are kept (captured at the sampler's last step, before the VAE decode):
training can use them without encoding the decoded image again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .sampler_settings import (FAMILY_DEFAULTS, IMAGE_FAMILIES, SAMPLERS,  # noqa: F401
                               SamplerSettings, SamplingError, check_sampling_section,
                               check_settings, settings_for)

def candidate_seed(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of prompt ``prompt_index``: a hash of the three, in
    [0, 2^31), so adding prompts or candidates never changes the seeds already drawn."""
    state = np.random.SeedSequence([base_seed, prompt_index, sample_index]).generate_state(1)
    return int(state[0]) & 0x7FFFFFFF


def configure_pipeline(adapter, settings: SamplerSettings):
    """The adapter's pipeline (the LoRA follows the adapter's switch) with the chosen sampler."""
    import diffusers
    pipe = adapter.sampling_pipeline()
    pipe.set_progress_bar_config(disable=True)
    if settings.sampler != "default":
        class_name, extra = SAMPLERS[settings.sampler]
        scheduler_cls = getattr(diffusers, class_name)
        pipe.scheduler = scheduler_cls.from_config(adapter.noise_scheduler.config, **extra)
    return pipe


def call_kwargs(adapter, settings: SamplerSettings) -> dict:
    """Keyword arguments of the pipeline call for these settings (size, frames, guidance)."""
    kwargs = dict(adapter.sampling_kwargs())
    for key in ("width", "height", "num_frames"):
        value = getattr(settings, key)
        if value:
            kwargs[key] = value
    kwargs.update(num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale)
    return kwargs


@dataclass
class Sample:
    frames: list[Image.Image]  # one for an image, the clip's frames for video
    latents: torch.Tensor  # the sampler's final latents, one sample (no batch dim), on CPU


@torch.no_grad()
def generate(pipe, adapter, settings: SamplerSettings, prompts: list[str], seeds: list[int],
             negative_prompts: list[str] | None = None) -> list[Sample]:
    """One sample per (prompt, seed), drawn in one pipeline call."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    negatives = negative_prompts or [settings.negative_prompt] * len(prompts)
    negatives = [n or settings.negative_prompt for n in negatives]
    final: dict[str, torch.Tensor] = {}

    def keep_latents(_pipe, _step, _t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    extra = {"negative_prompt": negatives} if any(negatives) else {}
    output = pipe(prompt=list(prompts), generator=generators, output_type="pil",
                  callback_on_step_end=keep_latents, callback_on_step_end_tensor_inputs=["latents"],
                  **extra, **call_kwargs(adapter, settings))
    frames = (output.frames if getattr(output, "frames", None) is not None
              else [[image] for image in output.images])
    latents = final["latents"].detach().to("cpu", torch.float32)
    return [Sample(frames=list(f), latents=latents[i].clone()) for i, f in enumerate(frames)]
