"""Each model family's declaration, without importing torch or diffusers: one `FamilyFacts` per
family, read by the start-up checks (`sipo_plugin.training.checks`), the data and the adapters.

The adapters (sd15.py, sdxl.py, cogvideox.py, wan.py) load and run the models; this table holds the
facts that settings are checked against before anything loads: the diffusers pipeline class a
model folder of the family declares in ``model_index.json``, the LoRA formats the adapter writes,
the prediction types it trains, whether a text-encoder LoRA is possible and, for the video
families, the frame count (4k+1), the frame-size multiple and the frozen text encoder. Models a
preset names instead of a path (the toy world's "toy") are registered here too (`NamedModel`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..utils.plugins import load_registrations

BASE_WEIGHTS_DTYPES = ("", "bf16", "fp8")  # [model] base_weights_dtype (see the video adapters)
# the Wan modules musubi-tuner's layout needs in every block (diffusers' converter pops exactly these)
MUSUBI_REQUIRED_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


@dataclass(frozen=True)
class FamilyFacts:
    """One family's declaration, read by the start-up checks (`sipo_plugin.training.checks`), the
    data and the adapters."""
    pipelines: tuple[str, ...]  # model_index.json "_class_name" values of the family's folders
    lora_formats: tuple[str, ...] = ("kohya", "diffusers")  # [export] lora_format choices
    video_size_multiple: int = 0  # video families: sides are multiples of it; 0: an image family
    display_name: str = ""
    text_encoder_kind: str = ""  # video families: the frozen text encoder, for messages
    base_model_version: str = ""  # the LoRA metadata's ss_base_model_version
    prediction_types: tuple[str, ...] = ("epsilon", "v_prediction")  # the objectives it trains
    frame_step: int = 0  # video families: clips are frame_step * k + 1 frames; 0: an image family

    @property
    def is_video(self) -> bool:
        return self.frame_step > 0

    @property
    def trains_text_encoder(self) -> bool:
        """A text-encoder LoRA is possible (the video families' T5 / UMT5 stays frozen)."""
        return not self.is_video


# the video VAEs compress time 4x after the first frame (clips of 4k+1 frames); sides: VAE 8x
# spatial x transformer patch 2
VIDEO_FRAME_STEP = 4
_VIDEO = {"video_size_multiple": 16, "frame_step": VIDEO_FRAME_STEP}
FAMILIES = {
    "sd15": FamilyFacts(("StableDiffusionPipeline",), display_name="SD1.5",
                        base_model_version="sd_v1"),
    "sdxl": FamilyFacts(("StableDiffusionXLPipeline",), display_name="SDXL",
                        base_model_version="sdxl_base_v1-0"),
    # CogVideoXPipeline loads diffusers keys transformer.<path>.lora_A.weight
    "cogvideox": FamilyFacts(("CogVideoXPipeline",), ("diffusers",), display_name="CogVideoX",
                             text_encoder_kind="T5", base_model_version="cogvideox",
                             prediction_types=("v_prediction",), **_VIDEO),
    # "kohya" is refused at config time
    "wan": FamilyFacts(("WanPipeline",), ("wan", "musubi"), display_name="Wan",
                       text_encoder_kind="UMT5", base_model_version="wan2.1",
                       prediction_types=("flow",), **_VIDEO),
}


@dataclass(frozen=True)
class NamedModel:
    """A model a preset names instead of a path (``pretrained_model_name_or_path``), registered by
    its owner (the toy world: "toy")."""
    family: str
    folder: Path  # its diffusers folder
    # (base samples, tuned samples, prompts) -> extra eval.json fields (None: none)
    evaluation_stats: Callable[[list, list, list[str]], dict] | None = None


_NAMED_MODELS: dict[str, NamedModel] = {}


def register_named_model(name: str, model: NamedModel) -> None:
    if _NAMED_MODELS.get(name, model) != model:
        raise ValueError(f"model name '{name}' is already registered")
    _NAMED_MODELS[name] = model


def named_model(name: str) -> NamedModel | None:
    """The registered model ``name`` stands for (None: ``name`` is a path)."""
    load_registrations()
    return _NAMED_MODELS.get(name)


def check_num_frames(num_frames: int, where: str = "num_frames",
                     frame_step: int = VIDEO_FRAME_STEP) -> int:
    """``num_frames`` must be frame_step * k + 1 (4k+1: 1, 5, 9, ..., 49, 81); ValueError (one
    line) otherwise."""
    if num_frames < 1 or (num_frames - 1) % frame_step:
        lower = max(1, (num_frames - 1) // frame_step * frame_step + 1)
        raise ValueError(f"{where}: num_frames must be {frame_step}k+1 (e.g. {lower} or "
                         f"{lower + frame_step}), got {num_frames}")
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
