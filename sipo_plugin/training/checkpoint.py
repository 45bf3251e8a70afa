"""Resumable training checkpoints: a folder per step of safetensors and JSON; never a pickle.

    <output_dir>/checkpoints/step_0000004/
        trained.safetensors    the trained tensors (the LoRA, or every U-Net weight), by the
                               stable names of ``loop.lora_state``
        optimizer.safetensors  the optimizer's state tensors, flattened to "<param index>.<name>"
        checkpoint.json        format, step, run id, the LR-scheduler state, the optimizer's param
                               groups, the objective's name and hyper-parameters (a calibrated
                               kappa included), the run's resolved config, a data fingerprint

The folder is built under a temporary name and renamed into place (utils.io.atomic_folder), so a
half-written checkpoint never has a ``step_*`` name and ``resume = "latest"`` never picks it up.
There is no RNG state to keep: every random draw is keyed by (seed, step, micro-batch, pair)
(loop.PairDraws), so the step is all a resumed run needs to continue bit-exactly.

Loading reads JSON and safetensors only. A pickled ``step_*.pt`` of older versions is refused
without being opened: unpickling runs whatever code the file names.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..utils.io import atomic_folder

CHECKPOINT_DIR = "checkpoints"
FORMAT = "sipo-plugin checkpoint 1"
STATE_FILE, TRAINED_FILE, OPTIMIZER_FILE = "checkpoint.json", "trained.safetensors", "optimizer.safetensors"
_NAME = re.compile(r"^step_(\d{7})$")
_PICKLE = re.compile(r"^step_(\d{7})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot (or must not) be resumed; the message is one line naming it."""


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step_{step:07d}"


def read_state(folder: Path) -> dict | None:
    """A checkpoint folder's checkpoint.json, or None when it is not one of ours."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and state.get("format") == FORMAT else None


def list_checkpoints(output_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoint folders of ``output_dir`` (of run ``run_id`` when given), oldest first."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = sorted(p for p in folder.iterdir() if _NAME.match(p.name) and p.is_dir())
    states = {p: read_state(p) for p in found}
    return [p for p in found if states[p] is not None
            and (run_id is None or states[p].get("run_id") == run_id)]


def pickled_checkpoints(output_dir: str | Path) -> list[Path]:
    """``step_*.pt`` files of older versions (refused: they are pickles)."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    return sorted(p for p in folder.iterdir() if _PICKLE.match(p.name)) if folder.is_dir() else []


def _flatten(prefix: str, value, tensors: dict, values: dict) -> None:
    if isinstance(value, dict):  # nested per-parameter state (bitsandbytes' quantization state)
        for name, inner in value.items():
            _flatten(f"{prefix}.{name}", inner, tensors, values)
    elif isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().to("cpu").contiguous()
    else:
        values[prefix] = value


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` -> (its tensors keyed "<param index>.<name>[.<name>...]", the
    rest as JSON: the param groups and every non-tensor per-parameter value, keyed alike)."""
    tensors, values = {}, {}
    for index, entries in state_dict["state"].items():
        _flatten(str(index), entries, tensors, values)
    return tensors, {"param_groups": state_dict["param_groups"], "values": values}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of ``flatten_optimizer_state``: a dict ``optimizer.load_state_dict`` takes."""
    state: dict[int, dict] = defaultdict(dict)
    for key, value in [*tensors.items(), *rest["values"].items()]:
        index, *path, name = key.split(".")
        entry = state[int(index)]
        for part in path:
            entry = entry.setdefault(part, {})
        entry[name] = value
    return {"state": dict(state), "param_groups": rest["param_groups"]}


def save_checkpoint(output_dir: str | Path, step: int, *, trained: dict[str, torch.Tensor],
                    optimizer_state: dict, info: dict, write_extra=None) -> Path:
    """Write checkpoint ``step`` atomically. ``info``: the JSON part (run_id, lr_scheduler,
    objective_name, objective_hyperparameters, config, data); ``write_extra(folder)`` adds files
    (an online run's pool, training/online.py)."""
    path = checkpoint_path(output_dir, step)
    optimizer_tensors, optimizer_rest = flatten_optimizer_state(optimizer_state)
    state = {"format": FORMAT, "step": step, **info, "optimizer": optimizer_rest}
    try:
        text = json.dumps(state, indent=1, sort_keys=True)
    except TypeError as err:  # a setting or optimizer value JSON cannot hold: say which
        raise CheckpointError(f"{path}: cannot write the checkpoint: {err}") from None
    with atomic_folder(path) as staging:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in trained.items()},
                  str(staging / TRAINED_FILE))
        save_file(optimizer_tensors, str(staging / OPTIMIZER_FILE))
        if write_extra is not None:
            write_extra(staging)
        (staging / STATE_FILE).write_text(text + "\n", encoding="utf-8")  # last: it marks completion
    return path


def prune_checkpoints(output_dir: str | Path, run_id: str, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints of run ``run_id`` (never another's)."""
    old = list_checkpoints(output_dir, run_id)[:-keep_last] if keep_last > 0 else []
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: a pickled checkpoint of an older sipo-plugin version; it is not loaded because "
        "unpickling can run any code the file holds. Start a new run (or another output_dir), "
        "or delete the .pt file")


def _describe_foreign_file(path: Path) -> str:
    """Why a file given to --resume is not a checkpoint (read from its header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, keys = f.metadata() or {}, list(f.keys())
    except (SafetensorError, OSError, ValueError):
        return "not a sipo-plugin checkpoint (a checkpoint is a folder checkpoints/step_NNNNNNN)"
    if "ss_network_module" in metadata or any("lora" in k for k in keys):
        return ("a LoRA file, not a training checkpoint: resume takes a checkpoint folder "
                "checkpoints/step_NNNNNNN (written by save_every_n_steps), which also holds the "
                "optimizer state")
    return "a safetensors file but not a sipo-plugin checkpoint (a checkpoint is a folder " \
           "checkpoints/step_NNNNNNN)"


def resolve_resume(resume: str, output_dir: str | Path, run_id: str | None = None) -> Path | None:
    """'' -> None; 'latest' -> the newest checkpoint of output_dir (of run ``run_id`` when known);
    a path -> its checkpoint folder (the folder, or a file in it). Everything else is refused with
    one line: no checkpoint, a pickled .pt, a LoRA file, a foreign file."""
    if not resume:
        return None
    checkpoints = Path(output_dir) / CHECKPOINT_DIR
    if resume == "latest":
        found = list_checkpoints(output_dir, run_id)
        pickles = pickled_checkpoints(output_dir)
        if pickles and (not found or pickles[-1].stem >= found[-1].name):
            raise _refuse_pickle(pickles[-1])
        if not found:
            raise CheckpointError(f"resume = \"latest\": no checkpoint in {checkpoints} (runs write "
                                  "them with save_every_n_steps); start without resume")
        return found[-1]
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"resume checkpoint not found: {path} (use resume = \"latest\" or a "
                              f"folder in {checkpoints})")
    if path.is_file() and path.suffix == ".pt":
        raise _refuse_pickle(path)
    folder = path if path.is_dir() else path.parent
    if read_state(folder) is None:
        reason = ("not a sipo-plugin checkpoint (no readable checkpoint.json)" if path.is_dir()
                  else _describe_foreign_file(path))
        raise CheckpointError(f"{path}: {reason}")
    return folder


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint folder -> {"step", "lora" (the trained tensors), "optimizer" (a state dict),
    "lr_scheduler", "objective_name", "objective_hyperparameters", "config", "run_id", "data"}."""
    folder = Path(path)
    state = read_state(folder)
    if state is None:
        raise CheckpointError(f"{folder}: not a sipo-plugin checkpoint (no readable checkpoint.json)")
    if state.get("shards"):  # one file per process (FSDP): each reads its own (sharded.py)
        return {**state, "lora": None, "optimizer": None}
    try:
        trained = load_file(str(folder / TRAINED_FILE))
        optimizer = unflatten_optimizer_state(load_file(str(folder / OPTIMIZER_FILE)),
                                              state["optimizer"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:  # truncated or edited by hand
        raise CheckpointError(f"{folder}: not a readable checkpoint ({type(err).__name__}); delete "
                              "it to resume from the previous one") from None
    return {**state, "lora": trained, "optimizer": optimizer}
