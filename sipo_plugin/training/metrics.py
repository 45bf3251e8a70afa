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

from ..objectives.registry import metrics_to_floats


class MetricsLogger:
    """Averages each metric over a log interval; keys present in only some steps average over those."""

    def __init__(self, path: Path, accelerator, log_with: str, run_config: dict):
        self.path = Path(path)
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self.last: dict = {}
        self._file = self.path.open("a", encoding="utf-8") if self.is_main else None
        self.trackers = False
        if log_with in ("tensorboard", "wandb"):
            if importlib.util.find_spec(log_with) is None:
                self.info(f"{log_with} is not installed (pip install {log_with}): logging to "
                          f"{self.path} only")
            else:
                accelerator.init_trackers("sipo", config=_flat_config(run_config),
                                          init_kwargs=tracker_init_kwargs(log_with, run_config, self.path.parent))
                self.trackers = True

    def info(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def event(self, name: str, **values) -> None:
        self._write({"event": name, "time": time.time(), **values})

    def accumulate(self, metrics: dict) -> None:
        """Add a step's metrics: floats, or 0-dim tensors summed where they are (no host sync);
        non-finite values are left out of their key's mean."""
        for key, value in metrics.items():
            if torch.is_tensor(value):
                value = value.detach().float()
                finite = torch.isfinite(value)
                self._sums[key] = self._sums[key] + torch.where(finite, value, 0.0)
                self._counts[key] = self._counts[key] + finite.to(torch.int64)
            elif value is not None and math.isfinite(value):
                self._sums[key] += float(value)
                self._counts[key] += 1

    def flush(self, step: int, **extra) -> dict:
        sums, counts = metrics_to_floats(self._sums), metrics_to_floats(self._counts)  # one sync per interval
        means = {f"train/{k}": sums[k] / counts[k] for k in sums if counts[k] > 0}
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
