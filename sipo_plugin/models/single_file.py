"""Single-file checkpoints (``.safetensors`` / ``.ckpt`` in the original LDM / SGM layout) through
diffusers' ``from_single_file``.

With ``model_config`` (a local diffusers folder of the same base model) nothing is downloaded.
Without it diffusers finds the configs itself: it infers the base model from the checkpoint's keys
and fetches that model's configs from the Hugging Face Hub (or its local cache). When that cannot
happen (``HF_HUB_OFFLINE=1`` with nothing cached, or no network), the error names the config folder
diffusers wanted, so it can be made from any diffusers copy of that base model (README,
"Single-file checkpoints").
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import fetch_diffusers_config
from safetensors import safe_open

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def config_repo_for(path: Path) -> str | None:
    """The Hub model whose configs diffusers uses for this checkpoint (its
    ``fetch_diffusers_config``), read from the safetensors header only (shapes on the meta device);
    None when it cannot tell (.ckpt, or an unexpected layout)."""
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}
        found = fetch_diffusers_config(shapes)
    except Exception:  # a header diffusers does not know: the message then names no model
        return None
    subfolder = f" (subfolder {found['subfolder']})" if found.get("subfolder") else ""
    return found["pretrained_model_name_or_path"] + subfolder


def needs_model_config(path: Path, parts: list[str], cause: str) -> ValueError:
    """One line: which config folder model_config must point at, and what is in it."""
    repo = config_repo_for(path)
    model = f"a diffusers copy of {repo}" if repo else "a diffusers copy of the same base model"
    folders = ", ".join([f"{name}/" for name in parts] + ["scheduler/"])
    return ValueError(f"{path}: the model's configs could not be fetched ({cause}); set model_config "
                      f"to a local folder with the configs of {model} (model_index.json, {folders}; "
                      "weights not needed): see README 'Single-file checkpoints'")


def load_single_file(path: Path, model_config: str, *, pipeline_cls, parts: list[str],
                     architecture: str, **kwargs):
    """The pipeline of a single-file checkpoint; ValueError (one line) when it cannot load."""
    where = f"the configs in {model_config}" if model_config else "its base model's configs"
    try:
        if model_config:
            return pipeline_cls.from_single_file(str(path), config=model_config,
                                                 local_files_only=True, **kwargs)
        return pipeline_cls.from_single_file(str(path), **kwargs)
    except OSError as err:  # the Hub's errors (offline, no network, not cached) are OSErrors
        if model_config:
            raise ValueError(f"{path}: model_config {model_config}: {_first_line(err)}") from err
        raise needs_model_config(path, parts, _first_line(err)) from err
    except (NotImplementedError, KeyError, RuntimeError, ValueError) as err:  # missing/mis-shaped weights
        raise ValueError(f"{path}: not an {architecture} checkpoint matching {where} "
                         f"({_first_line(err)})") from err
