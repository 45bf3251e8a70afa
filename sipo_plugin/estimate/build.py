"""The run's model on the meta device: the same adapter, LoRA / full fine-tuning and reference as
training builds (the real code paths), with shapes and dtypes but no weights read or allocated.

The architecture comes from the model folder's config files (``unet/config.json`` ...: a diffusers
folder, a single file's ``model_config``, or the toy model); when the preset's model cannot be
read, from the family's published architecture (architectures.py) with a note; a family without
one stops with one line (EstimateError).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .architectures import PUBLISHED, PUBLISHED_NAMES, SCHEDULER


class EstimateError(ValueError):
    """--estimate cannot build the model: one line naming the file and the fix."""


def _component_class(name: str):
    import diffusers
    import transformers
    return getattr(diffusers, name, None) or getattr(transformers, name)


def build_module(class_name: str, config: dict, device: str | torch.device = "meta"
                 ) -> torch.nn.Module:
    """A diffusers model or transformers text encoder from its config: on the meta device
    (accelerate's init_empty_weights: nothing allocated), or with random weights on ``device``."""
    from accelerate import init_empty_weights
    cls = _component_class(class_name)
    if str(device) == "meta":
        with init_empty_weights():
            return _construct(cls, config)
    with torch.device(device):
        return _construct(cls, config)


def _construct(cls, config) -> torch.nn.Module:
    if hasattr(cls, "from_config"):  # diffusers ModelMixin
        return cls.from_config(config)
    config_cls = cls.config_class
    return cls(config if isinstance(config, config_cls) else config_cls(**config))


def read_folder_config(folder: Path, component: str, class_name: str):
    """The component's config as its class reads it (``<folder>/<component>/config.json``)."""
    cls = _component_class(class_name)
    if hasattr(cls, "load_config"):
        return dict(cls.load_config(folder / component))
    return cls.config_class.from_pretrained(folder / component)


def architecture_of(config) -> tuple[dict, str]:
    """{component: (class name, config)} and where they come from (one line)."""
    from ..training.checks import model_folder
    family = config.model.family
    folder = model_folder(config)
    readable = folder is not None and (Path(folder) / "model_index.json").is_file()
    if family not in PUBLISHED:
        if readable:
            raise EstimateError(f"--estimate: family '{family}' is not estimated yet (sd15 and sdxl "
                                "are); the model folder is not needed to see that")
        raise EstimateError(f"--estimate: cannot read the {family} model "
                            f"({config.model.pretrained_model_name_or_path}): set "
                            "pretrained_model_name_or_path to a local diffusers folder")
    parts = PUBLISHED[family]
    if not readable:
        return dict(parts), (f"model {config.model.pretrained_model_name_or_path} not readable: "
                             f"the published {PUBLISHED_NAMES[family]} architecture (typed in)")
    try:
        return ({name: (cls, read_folder_config(Path(folder), name, cls))
                 for name, (cls, _) in parts.items()}, f"architecture read from {folder}")
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EstimateError(f"--estimate: cannot read the model configs in {folder}: {first}") from None


def meta_components(architecture: dict) -> dict:
    """Every component on the meta device, plus the training scheduler (no tokenizers needed)."""
    from diffusers import DDPMScheduler
    components = {name: build_module(cls, cfg) for name, (cls, cfg) in architecture.items()}
    components.update(scheduler=DDPMScheduler(**SCHEDULER), tokenizer=None, tokenizer_2=None)
    return components


class _Quiet:
    """The log the reference builder writes to (--estimate prints its own report)."""

    def info(self, message: str) -> None:
        pass

    event = info


def meta_run(config, components: dict):
    """(adapter, trained params, live reference) as the trainer builds them, on the meta device."""
    from ..models import get_model_adapter
    from ..training.loop import WEIGHT_DTYPES
    from ..training.memory import cast_trainable_to_bf16
    from ..training.reference import make_reference
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()  # "modules kept in float32: []" on every cast
    adapter = get_model_adapter(config.model.family)(
        components, device=torch.device("meta"),
        weight_dtype=WEIGHT_DTYPES[config.training.mixed_precision],
        clip_skip=config.model.clip_skip)
    reference = make_reference(config, adapter, _Quiet())
    try:
        params = adapter.add_trainable(config.network)
    except (OSError, ValueError, RuntimeError) as err:
        raise EstimateError(f"--estimate: the network settings do not apply on the meta device "
                            f"({str(err).splitlines()[0]})") from None
    if config.training.full_bf16:
        cast_trainable_to_bf16(params)
    return adapter, params, reference
