"""A run owns its output folder: ``run.toml`` names the run, the files it writes carry its id.

``<output_dir>/run.toml`` is the run's full resolved config (a preset: ``--preset run.toml``
trains it again, like sd-scripts' ``--output_config``) plus a ``[run]`` table with the run id.
Checkpoints carry the id in ``checkpoint.json``, LoRA files in their ``sipo_run_id`` metadata. A
new run into a folder holding another run's files stops (unless ``overwrite``), and pruning
(``save_last_n``) deletes only files carrying this run's id.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..utils.io import atomic_write_text
from .checkpoint import CHECKPOINT_DIR, pickled_checkpoints, read_state
from .config import Config
from .config_layers import config_to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RUN_FILE = "run.toml"
METRICS_FILE = "metrics.jsonl"
RUN_ID_KEY = "sipo_run_id"  # LoRA metadata
_DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
_FULL_METADATA = "sipo_training.json"


class RunFolderError(ValueError):
    """The output folder belongs to another run; one line naming it and the ways out."""


def folder_run_id(output_dir: str | Path) -> str | None:
    """The id in ``<output_dir>/run.toml`` (None: no run.toml, or one without an id)."""
    try:
        data = tomllib.loads((Path(output_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    run = data.get("run")
    return run.get("id") if isinstance(run, dict) else None


def write_run_file(config: Config, run_id: str) -> Path:
    """``run.toml``: [run] id and start time, then every setting of the resolved config."""
    document = {"run": {"id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                **config.to_dict()}
    header = ("# The resolved config of this run (written by sipo-plugin; [run] is ignored when "
              "this file is used as a preset).\n")
    return atomic_write_text(Path(config.training.output_dir) / RUN_FILE,
                             header + config_to_toml(document))


def lora_run_id(path: Path) -> str | None:
    """The run id a LoRA file (or a diffusers LoRA folder) carries; None when it has none."""
    file = path / _DIFFUSERS_LORA if path.is_dir() else path
    try:
        with safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get(RUN_ID_KEY)
    except (SafetensorError, OSError, ValueError):
        return None


def _is_export(path: Path) -> bool:
    """A trained result at the top of the folder: a .safetensors file with LoRA or sipo metadata,
    a diffusers LoRA folder, or a full fine-tuning pipeline folder."""
    if path.is_dir():
        return (path / _DIFFUSERS_LORA).is_file() or (path / _FULL_METADATA).is_file()
    if path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return False
    return RUN_ID_KEY in metadata or "ss_network_module" in metadata


def _carried_id(path: Path) -> str | None:
    if path.is_dir() and (path / _FULL_METADATA).is_file():
        try:
            return json.loads((path / _FULL_METADATA).read_text(encoding="utf-8")).get(RUN_ID_KEY)
        except (OSError, ValueError):
            return None
    return lora_run_id(path)


def foreign_files(output_dir: str | Path, run_id: str, resuming: bool) -> list[Path]:
    """Files of ``output_dir`` that are not run ``run_id``'s: checkpoints and exports carrying
    another id, pickled checkpoints, and run.toml and metrics.jsonl of another run. A file that
    carries no id (an export of an older version) belongs to the folder's run.toml run; with no
    run.toml, it is foreign to a new run and taken as the resumed run's own."""
    folder = Path(output_dir)
    owner = folder_run_id(folder)
    unknown_is_foreign = (owner is not None and owner != run_id) or (owner is None and not resuming)
    found: list[Path] = []
    if (folder / RUN_FILE).is_file() and owner != run_id:
        found.append(folder / RUN_FILE)
    if (folder / METRICS_FILE).is_file() and unknown_is_foreign:
        found.append(folder / METRICS_FILE)
    checkpoints = folder / CHECKPOINT_DIR
    if checkpoints.is_dir():
        for path in sorted(checkpoints.iterdir()):
            state = read_state(path) if path.is_dir() else None
            if state is not None and state.get("run_id") != run_id:
                found.append(path)
        found.extend(pickled_checkpoints(folder))
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.name != CHECKPOINT_DIR and _is_export(path):
                carried = _carried_id(path)
                if carried != run_id and (carried is not None or unknown_is_foreign):
                    found.append(path)
    return found


def unsaved_run_files(output_dir: str | Path, foreign: list[Path]) -> list[Path]:
    """``foreign`` when it is only run.toml and metrics.jsonl: the folder's run stopped before its
    first checkpoint or export (a crash or Ctrl-C at start-up), so it left nothing to resume or
    keep, and running the same command again may take the folder over. Else []."""
    folder = Path(output_dir)
    leftovers = {folder / RUN_FILE, folder / METRICS_FILE}
    named = folder / RUN_FILE in foreign and folder_run_id(folder) is not None  # not a legacy folder
    return foreign if named and set(foreign) <= leftovers else []


def set_aside(path: Path, run_id: str | None) -> Path:
    """Rename ``path`` to ``<stem>.<run_id><suffix>`` beside it (never deletes)."""
    target = path.with_name(f"{path.stem}.{run_id or 'unnamed'}{path.suffix}")
    path.replace(target)
    return target


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def claim_output_dir(config: Config, run_id: str, resuming: bool, accelerator, log) -> None:
    """Stop when ``output_dir`` holds another run's files (or, with ``overwrite``, delete them),
    then write run.toml. Runs before anything is written, so a refused run changes nothing; every
    process checks, the main process writes once all have."""
    t = config.training
    foreign = foreign_files(t.output_dir, run_id, resuming)
    owner = folder_run_id(t.output_dir)
    unsaved = [] if t.overwrite else unsaved_run_files(t.output_dir, foreign)
    if unsaved:  # kept renamed below, not deleted
        foreign = []
    if foreign and not t.overwrite:
        names = ", ".join(str(p.relative_to(t.output_dir)) for p in foreign[:4])
        more = f" and {len(foreign) - 4} more" if len(foreign) > 4 else ""
        resumable = any(p.parent.name == CHECKPOINT_DIR and p.suffix != ".pt" for p in foreign)
        raise RunFolderError(
            f"{t.output_dir} holds another run's files ({names}{more}"
            f"{f'; run {owner}' if owner else ''}): "
            f"{'continue that run with --resume latest, ' if resumable else ''}"
            "choose another --output_dir, or pass --overwrite to delete them")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if unsaved:
            kept = [set_aside(path, owner).name for path in unsaved]
            log(f"note: run {owner} in {t.output_dir} stopped before its first save; its "
                f"{' and '.join(kept)} are kept beside this run's")
        for path in foreign:
            _remove(path)
        if foreign:
            log(f"--overwrite: deleted {len(foreign)} files of another run from {t.output_dir}")
        write_run_file(config, run_id)


def step_lora_name(output_name: str, step: int) -> str:
    """sd-scripts' name of the LoRA saved at ``step``: <output_name>-<step:06d>."""
    return f"{output_name}-{step:06d}"


def step_loras(output_dir: str | Path, output_name: str, run_id: str) -> list[Path]:
    """This run's every-save LoRA files (or diffusers folders), oldest first."""
    pattern = re.compile(rf"^{re.escape(output_name)}-(\d{{6}})(\.safetensors)?$")
    folder = Path(output_dir)
    found = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if (m := pattern.match(p.name))) if folder.is_dir() else []
    return [p for _, p in found if lora_run_id(p) == run_id]


def prune_step_loras(output_dir: str | Path, output_name: str, run_id: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` every-save LoRA files of run ``run_id``."""
    for path in step_loras(output_dir, output_name, run_id)[:-keep_last]:
        _remove(path)
