"""What a ``save_every_n_steps`` save writes: the resumable checkpoint of that step."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import prune_checkpoints, save_checkpoint
from .config import Config


def new_run_id() -> str:
    """A run's id: random, carried by its checkpoints (and kept by a resumed run)."""
    return uuid.uuid4().hex[:16]


def pairs_fingerprint(records) -> dict:
    """The pair list a run trains on, for resume to compare: its size and a sha256 of every
    pair's prompt, image sources and weight, in order."""
    from ..data.cache import fingerprint
    return {"pairs": len(records),
            "sha256": fingerprint([[r.prompt, str(r.chosen), str(r.rejected), r.weight]
                                   for r in records])}


@dataclass(frozen=True)
class RunIdentity:
    """Who is saving: the run's id and the data it trains on."""

    run_id: str
    data: dict  # pairs_fingerprint


def save_training_state(config: Config, step: int, adapter, objective, optimizer, lr_scheduler,
                        run: RunIdentity) -> Path:
    """Checkpoint ``step`` (see checkpoint.py), then prune this run's older checkpoints."""
    from .loop import lora_state
    path = save_checkpoint(config.training.output_dir, step, trained=lora_state(adapter),
                           optimizer_state=optimizer.state_dict(), info={
                               "run_id": run.run_id, "lr_scheduler": lr_scheduler.state_dict(),
                               "objective_name": objective.name,
                               "objective_hyperparameters": objective.hyperparameters(),
                               "config": config.to_dict(), "data": run.data})
    prune_checkpoints(config.training.output_dir, run.run_id, config.training.save_last_n)
    return path
