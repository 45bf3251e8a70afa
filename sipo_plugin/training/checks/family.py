"""The model family's rules, read from its declaration (`sipo_plugin.models.families`): a known
family, its own settings (e.g. wan: musubi LoRAs need the FFN targets) and, for the video
families, the clip length and size."""

from __future__ import annotations

from ...models.families import (BASE_WEIGHTS_DTYPES, FAMILIES, check_musubi_targets,
                                check_num_frames, check_video_size)
from ..config_parsing import closest
from ..config_schema import Config, ConfigError


def known_family(name: str, where: str) -> None:
    """``name`` is a declared family (ConfigError naming the closest and every one)."""
    if name not in FAMILIES:
        raise ConfigError(f"{where}: unknown model family '{name}'; available: "
                          f"{', '.join(sorted(FAMILIES))}{closest(name, FAMILIES)}")


def family(config: Config) -> None:
    where = config.source
    known_family(config.model.family, where)
    try:
        family_settings(config)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    try:
        video_settings(config)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def video_settings(config: Config, where: str | None = None) -> None:
    """A family's [data] video settings: 4k+1 frames, a size its adapter accepts, fps >= 0; and
    [model] base_weights_dtype. Image families must leave ``num_frames = 0``."""
    facts = FAMILIES[config.model.family]
    where = where or config.source
    d = config.data
    if config.model.base_weights_dtype not in BASE_WEIGHTS_DTYPES:
        raise ValueError(f"{where}: base_weights_dtype must be one of "
                         f"{', '.join(map(repr, BASE_WEIGHTS_DTYPES))}, "
                         f"got {config.model.base_weights_dtype!r}")
    if not facts.is_video:
        if d.num_frames:
            video = ", ".join(name for name, f in FAMILIES.items() if f.is_video)
            raise ValueError(f"{where}: num_frames is for video families ({video}); "
                             f"set num_frames = 0 for {config.model.family}")
        return
    check_num_frames(d.num_frames, where, facts.frame_step)
    if d.frame_fps < 0:
        raise ValueError(f"{where}: frame_fps must be >= 0 (0: the source's own frames), "
                         f"got {d.frame_fps}")
    check_video_size(d.video_height, d.video_width, facts.video_size_multiple,
                     config.model.family, where)


def family_settings(config: Config) -> None:
    """Family-specific settings, checked before anything loads (ValueError, one line)."""
    facts = FAMILIES[config.model.family]
    if config.model.family == "sdxl" and config.model.clip_skip == 1:
        # SDXL reads hidden states without the final layer norm: clip_skip 1 has no meaning
        raise ValueError("clip_skip = 1: SDXL conditions on the penultimate layer (clip_skip 2, "
                         "the default); use 0, 2 or more")
    if not facts.is_video:
        return
    if config.network.train_text_encoder and not facts.trains_text_encoder:
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
