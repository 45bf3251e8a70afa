"""A run's identity and its saves: the run id (new, or the resumed checkpoint's), the checks
made before anything is written, and what a ``save_every_n_steps`` save writes."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import prune_checkpoints, save_checkpoint
from .config import Config
from .exporting import export
from .memory import optimizer_name
from .resume import check_resume
from .result import TrainResult, lora_state
from .run_folder import METRICS_FILE, claim_output_dir, prune_step_loras, step_lora_name


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
    started_at: float = field(default_factory=time.time)  # this session's start (LoRA metadata)


def start_run(config: Config, checkpoint: dict | None, resume_from: Path | None, records,
              accelerator) -> RunIdentity:
    """The run's identity; a resume is checked against its checkpoint, then the output folder is
    claimed (another run's files stop the run) and run.toml written."""
    run_id = checkpoint["run_id"] if checkpoint is not None else new_run_id()
    if accelerator.num_processes > 1:  # one id for every process: the main process's
        from accelerate.utils import broadcast_object_list
        run_id = broadcast_object_list([run_id])[0]
    run = RunIdentity(run_id=run_id, data=pairs_fingerprint(records))

    def say(message: str) -> None:
        if accelerator.is_main_process:
            tqdm.write(message)

    if checkpoint is not None:
        check_resume(config, checkpoint, resume_from, run.data, say)
    claim_output_dir(config, run.run_id, checkpoint is not None, accelerator, say)
    return run


def save_training_state(config: Config, step: int, adapter, objective, optimizer, lr_scheduler,
                        run: RunIdentity, write_extra=None, accelerator=None) -> Path:
    """Checkpoint ``step`` (see checkpoint.py) and, for a LoRA, <output_name>-<step:06d> in the
    run's LoRA format (sd-scripts' every-N-steps name); then prune this run's older ones. Under
    FSDP every process calls it and writes its shard (sharded.py); no step LoRA is written (its
    weights are sharded)."""
    from .distributed import parallelism
    t = config.training
    info = {"run_id": run.run_id, "lr_scheduler": lr_scheduler.state_dict(),
            "objective_name": objective.name,
            "objective_hyperparameters": objective.hyperparameters(),
            "config": config.to_dict(), "data": run.data}
    if accelerator is not None and parallelism(accelerator) == "fsdp":
        from .sharded import save_sharded_checkpoint, trained_parameters
        path = save_sharded_checkpoint(t.output_dir, step,
                                       trained=trained_parameters(adapter.trainable_modules()),
                                       optimizer_state=optimizer.state_dict(), info=info,
                                       accelerator=accelerator, write_extra=write_extra)
        if accelerator.is_main_process:
            prune_checkpoints(t.output_dir, run.run_id, t.save_last_n)
        return path
    path = save_checkpoint(t.output_dir, step, trained=lora_state(adapter),
                           optimizer_state=optimizer.state_dict(), info=info,
                           write_extra=write_extra)
    prune_checkpoints(t.output_dir, run.run_id, t.save_last_n)
    if config.network.finetune == "lora":
        state = TrainResult(adapter=adapter, objective=objective, accelerator=None, steps=step,
                            num_pairs=run.data["pairs"], started_at=run.started_at,
                            metrics_log=Path(t.output_dir) / METRICS_FILE, run_id=run.run_id,
                            optimizer=optimizer_name(getattr(optimizer, "optimizer", optimizer)))
        export(config, state, name=step_lora_name(t.output_name, step))
        prune_step_loras(t.output_dir, t.output_name, run.run_id, t.save_last_n)
    return path
