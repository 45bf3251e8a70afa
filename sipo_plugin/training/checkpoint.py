"""Training checkpoints: a plain, complete dict per file, written atomically, the last K kept.

A checkpoint holds what a resumed run needs to continue exactly where it stopped on CPU: the
trained weights, the optimizer and LR-schedule states, the optimizer step (the data order and every
random draw are pure functions of seed and position), the calibrated objective and the resolved
config.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import torch

from ..utils.io import _atomic_write

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{7})\.pt$")


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def save_checkpoint(output_dir: str | Path, step: int, state: dict, keep_last: int) -> Path:
    """Write ``state`` atomically, then delete all but the newest ``keep_last`` checkpoints."""
    path = checkpoint_path(output_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    # streamed into the temp file: a full fine-tuning state (weights + optimizer) is not copied
    # into memory a second time
    _atomic_write(path, partial(torch.save, state))
    for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """'' -> None; 'latest' -> the newest checkpoint of output_dir (None if there is none); a path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint not found: {path} "
                                f"(use resume = \"latest\" or a file in {Path(output_dir) / CHECKPOINT_DIR})")
    return path


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which and what to do
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}); delete it "
                         "to resume from the previous one") from None
