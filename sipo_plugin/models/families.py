"""What config checks need to know about each model family, without importing torch or diffusers.

The adapters (sd15.py, sdxl.py, cogvideox.py, wan.py) load and run the models; this table holds the
facts that settings are checked against before anything loads: the diffusers pipeline class a
model folder of the family declares in ``model_index.json``, the LoRA formats the adapter writes,
and, for the video families, the frame-size multiple and the frozen text encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BASE_WEIGHTS_DTYPES = ("", "bf16", "fp8")  # [model] base_weights_dtype (see the video adapters)
# the Wan modules musubi-tuner's layout needs in every block (diffusers' converter pops exactly these)
MUSUBI_REQUIRED_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


@dataclass(frozen=True)
class FamilyFacts:
    pipelines: tuple[str, ...]  # model_index.json "_class_name" values of the family's folders
    lora_formats: tuple[str, ...] = ("kohya", "diffusers")
    video_size_multiple: int = 0  # video families: sides are multiples of it; 0: an image family
    display_name: str = ""
    text_encoder_kind: str = ""  # video families: the frozen text encoder, for messages


FAMILIES = {
    "sd15": FamilyFacts(("StableDiffusionPipeline",), display_name="SD1.5"),
    "sdxl": FamilyFacts(("StableDiffusionXLPipeline",), display_name="SDXL"),
    # CogVideoXPipeline loads diffusers keys transformer.<path>.lora_A.weight
    "cogvideox": FamilyFacts(("CogVideoXPipeline",), ("diffusers",), 16, "CogVideoX", "T5"),
    # VAE 8x spatial compression x transformer patch 2; "kohya" is refused at config time
    "wan": FamilyFacts(("WanPipeline",), ("wan", "musubi"), 16, "Wan", "UMT5"),
}


def check_num_frames(num_frames: int, where: str = "num_frames") -> int:
    """``num_frames`` must be 4k+1 (1, 5, 9, ..., 49, 81); ValueError (one line) otherwise."""
    if num_frames < 1 or (num_frames - 1) % 4:
        lower = max(1, (num_frames - 1) // 4 * 4 + 1)
        raise ValueError(f"{where}: num_frames must be 4k+1 (e.g. {lower} or {lower + 4}), "
                         f"got {num_frames}")
    return num_frames


def check_video_size(height: int, width: int, multiple: int, family: str, where: str = "") -> None:
    """``video_height`` and ``video_width`` must be positive multiples of ``multiple``."""
    for key, value in (("video_height", height), ("video_width", width)):
        if value <= 0 or value % multiple:
            near = max(multiple, round(value / multiple) * multiple)
            raise ValueError(f"{where + ': ' if where else ''}{key} must be a positive multiple of "
                             f"{multiple} for {family}, got {value} (try {near})")


def check_musubi_targets(target_modules) -> None:
    """The musubi layout needs attention and FFN LoRA in every block (diffusers refuses less)."""
    missing = [t for t in MUSUBI_REQUIRED_TARGETS if t not in target_modules]
    if missing:
        raise ValueError(
            f"lora_format 'musubi' needs LoRA on every block's attention and FFN: add "
            f"{', '.join(repr(m) for m in missing)} to network_target_modules (or use lora_format 'wan')")


def check_video_config(config, where: str | None = None) -> None:
    """A family's [data] video settings: 4k+1 frames, a size its adapter accepts, fps >= 0; and
    [model] base_weights_dtype. Image families must leave ``num_frames = 0``."""
    facts = FAMILIES[config.model.family]
    where = where or config.source
    d = config.data
    if config.model.base_weights_dtype not in BASE_WEIGHTS_DTYPES:
        raise ValueError(f"{where}: base_weights_dtype must be one of "
                         f"{', '.join(map(repr, BASE_WEIGHTS_DTYPES))}, "
                         f"got {config.model.base_weights_dtype!r}")
    if not facts.video_size_multiple:
        if d.num_frames:
            raise ValueError(f"{where}: num_frames is for video families (cogvideox, wan); "
                             f"set num_frames = 0 for {config.model.family}")
        return
    check_num_frames(d.num_frames, where)
    if d.frame_fps < 0:
        raise ValueError(f"{where}: frame_fps must be >= 0 (0: the source's own frames), "
                         f"got {d.frame_fps}")
    check_video_size(d.video_height, d.video_width, facts.video_size_multiple,
                     config.model.family, where)


def check_family_config(config) -> None:
    """Family-specific settings, checked before anything loads (ValueError, one line)."""
    facts = FAMILIES[config.model.family]
    if config.model.family == "sdxl" and config.model.clip_skip == 1:
        # SDXL reads hidden states without the final layer norm: clip_skip 1 has no meaning
        raise ValueError("clip_skip = 1: SDXL conditions on the penultimate layer (clip_skip 2, "
                         "the default); use 0, 2 or more")
    if not facts.video_size_multiple:
        return
    if config.network.train_text_encoder:
        raise ValueError(f"train_text_encoder is not supported for {facts.display_name} (the "
                         f"{facts.text_encoder_kind} encoder stays frozen); set it to false")
    image_only = {"network_weights": config.network.network_weights,
                  "conv_dim": config.network.conv_dim, "use_dora": config.network.use_dora,
                  "clip_skip": config.model.clip_skip}
    used = [key for key, value in image_only.items() if value]
    if used:
        raise ValueError(f"{', '.join(used)}: SD1.5 / SDXL settings, not supported for "
                         f"{facts.display_name}; remove them from the preset")
    if config.model.family != "wan":
        return
    if config.network.finetune == "full" and config.model.base_weights_dtype:
        raise ValueError("base_weights_dtype stores the frozen base weights in low precision, but "
                         "finetune = \"full\" trains them; set base_weights_dtype = \"\"")
    if config.export.lora_format == "musubi":
        check_musubi_targets(config.network.network_target_modules)


def folder_pipeline_class(model_path: str | Path) -> str | None:
    """The diffusers pipeline class a model folder declares (``model_index.json``), or None when
    it is not a diffusers folder or the file does not say."""
    index = Path(model_path) / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def family_of_pipeline(pipeline_class: str) -> str | None:
    """The family whose folders declare ``pipeline_class`` (None: not one this package trains)."""
    return next((name for name, facts in FAMILIES.items() if pipeline_class in facts.pipelines), None)
