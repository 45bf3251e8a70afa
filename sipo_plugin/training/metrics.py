"""Metric logging: interval means to a JSONL file (always) and to accelerate's trackers (optional)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm


class MetricsLogger:
    """Averages each metric over a log interval; keys present in only some steps average over those."""

    def __init__(self, path: Path, accelerator, log_with: str, run_config: dict):
        self.path = Path(path)
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self._pending: list[tuple[list[str], torch.Tensor]] = []  # (keys, their values) per step
        self.last: dict = {}
        self._file = self.path.open("a", encoding="utf-8") if self.is_main else None
        self.trackers = False
        if log_with in ("tensorboard", "wandb"):
            if importlib.util.find_spec(log_with) is None:
                self.info(f"{log_with} is not installed (pip install {log_with}): logging to "
                          f"{self.path} only")
            else:
                # TensorBoard writes to <output_dir>/<project>/: one folder per output_name
                project = run_config["training"]["output_name"] if log_with == "tensorboard" else "sipo"
                accelerator.init_trackers(project, config=_flat_config(run_config),
                                          init_kwargs=tracker_init_kwargs(log_with, run_config, self.path.parent))
                self.trackers = True

    def info(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def event(self, name: str, **values) -> None:
        self._write({"event": name, "time": time.time(), **values})

    def accumulate(self, metrics: dict) -> None:
        """Add a step's metrics: floats now, 0-dim tensors stacked where they are and read at the
        next flush (no host sync per step); non-finite values are left out of their key's mean."""
        tensors = {k: v for k, v in metrics.items() if torch.is_tensor(v)}
        if tensors:
            device = next(iter(tensors.values())).device
            self._pending.append((list(tensors), torch.stack(
                [v.detach().float().reshape(()).to(device) for v in tensors.values()])))
        for key, value in metrics.items():
            if key not in tensors:
                self._add(key, value)

    def _add(self, key: str, value) -> None:
        if value is not None and math.isfinite(value):
            self._sums[key] += float(value)
            self._counts[key] += 1

    def flush(self, step: int, **extra) -> dict:
        if self._pending:  # one host transfer for the interval
            values = torch.cat([v for _, v in self._pending]).tolist()
            keys = [k for names, _ in self._pending for k in names]
            for key, value in zip(keys, values, strict=True):
                self._add(key, value)
            self._pending.clear()
        means = {f"train/{k}": self._sums[k] / self._counts[k] for k in self._sums}
        means.update({f"train/{k}": v for k, v in extra.items()})
        self._sums.clear()
        self._counts.clear()
        self.last = means
        self._write({"step": step, "time": time.time(), **means})
        if self.trackers:
            self.accelerator.log(means, step=step)
        return means

    def _write(self, row: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.trackers:
            self.accelerator.end_training()


def tracker_init_kwargs(log_with: str, run_config: dict, output_dir: Path) -> dict:
    """wandb: the run is named by output_name (as the kohya_ss GUI names it) and its files go to
    WANDB_DIR, else the output folder; WANDB_MODE=offline logs without an account or network."""
    if log_with != "wandb":
        return {}
    return {"wandb": {"name": run_config["training"]["output_name"],
                      "dir": os.environ.get("WANDB_DIR", str(output_dir))}}


def _flat_config(config: dict) -> dict:
    """TensorBoard hparams take scalars and strings only."""
    flat = {}
    for section, values in config.items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
