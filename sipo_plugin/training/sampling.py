"""Sample images (or clips) for fixed prompts and one fixed seed during training.

Every ``sample_every_n_steps`` steps and at the end, each prompt of ``sample_prompts`` is sampled
with the trained model (LoRA on) into ``<output_dir>/samples/<output_name>_<step>_<i>.png``
(``.gif`` for video families), like sd-scripts' sample images. The seed is the same at every step,
so the files show what training changed.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from ..data.video import save_clip
from ..utils.io import atomic_write_bytes


def _as_frames(output) -> list[Image.Image]:
    """A diffusers pipeline output for one prompt -> its PIL frames (an image is one frame)."""
    if getattr(output, "frames", None) is not None:
        return list(output.frames[0])
    return [output.images[0]]


@torch.no_grad()
def save_samples(adapter, training, step: int) -> list[Path]:
    """Sample every prompt of ``training.sample_prompts`` with the current weights."""
    pipe = adapter.sampling_pipeline()
    pipe.set_progress_bar_config(disable=True)
    out_dir = Path(training.output_dir) / "samples"
    written = []
    for i, prompt in enumerate(training.sample_prompts):
        generator = torch.Generator("cpu").manual_seed(training.sample_seed)
        output = pipe(prompt=prompt, generator=generator, output_type="pil",
                      num_inference_steps=training.sample_steps,
                      guidance_scale=training.sample_guidance_scale, **adapter.sampling_kwargs())
        frames = _as_frames(output)
        stem = out_dir / f"{training.output_name}_{step:06d}_{i:02d}"
        if len(frames) > 1:
            written.append(save_clip(frames, stem.with_suffix(".gif")))
        else:
            buffer = io.BytesIO()
            frames[0].save(buffer, format="PNG")
            written.append(atomic_write_bytes(stem.with_suffix(".png"), buffer.getvalue()))
    return written
