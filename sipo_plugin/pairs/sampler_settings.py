"""Sampler settings of ``sipo-pairs sample`` and the [sampling] preset section (no torch: config
validation and ``--check`` read them); sampling itself is in `sampler.py`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# sampler name -> (diffusers scheduler class name, extra config); "default": the family's own
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False, "timestep_spacing": "trailing"}),
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
IMAGE_FAMILIES = ("sd15", "sdxl")  # the video families keep their pipeline's own sampler

# per-family defaults (sd-scripts' sample defaults for SD; the model cards' for video)
FAMILY_DEFAULTS: dict[str, dict] = {
    "sd15": {"sampler": "ddim", "steps": 30, "guidance_scale": 7.5},
    "sdxl": {"sampler": "euler", "steps": 30, "guidance_scale": 7.0},
    "cogvideox": {"sampler": "default", "steps": 50, "guidance_scale": 6.0},
    "wan": {"sampler": "default", "steps": 50, "guidance_scale": 5.0},
}


class SamplingError(ValueError):
    """A sampler setting that cannot work; the message is one line."""


@dataclass(frozen=True)
class SamplerSettings:
    """How samples are drawn. ``width`` / ``height`` 0: the model's native size; ``num_frames`` 0:
    the video family's default clip length."""

    sampler: str = "default"
    steps: int = 30
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    num_frames: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def settings_for(family: str, **given) -> SamplerSettings:
    """The family's defaults, overridden by every ``given`` value that is not None / ''."""
    values = dict(FAMILY_DEFAULTS.get(family, {}))
    values.update({k: v for k, v in given.items() if v is not None and v != ""})
    settings = SamplerSettings(**values)
    check_settings(settings, family)
    return settings


def check_settings(settings: SamplerSettings, family: str) -> None:
    allowed = ("default", *SAMPLERS) if family in IMAGE_FAMILIES else ("default",)
    if settings.sampler not in allowed:
        raise SamplingError(f"sampler '{settings.sampler}' is not available for {family}; "
                            f"choose one of {', '.join(allowed)}")
    if settings.steps < 1:
        raise SamplingError(f"sampler steps must be >= 1, got {settings.steps}")
    if min(settings.width, settings.height, settings.num_frames) < 0:
        raise SamplingError("width, height and num_frames must be >= 0 (0: the model's default)")


def check_sampling_section(sampling, family: str) -> None:
    """A preset's [sampling] keys (0 / -1 / '': the family's default) for ``family``."""
    settings_for(family, sampler=sampling.sampler or None)
    if sampling.sample_batch_size < 1 or min(sampling.width, sampling.height) < 0:
        raise SamplingError("'sample_batch_size' must be >= 1, 'width' and 'height' >= 0")
