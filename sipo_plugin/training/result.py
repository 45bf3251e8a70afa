"""What a training run hands on: the `TrainResult` and the trained tensors by a stable name.

Apart from the loop so that checkpointing (saving.py) and export (exporting.py) read a run's
result without importing the loop that makes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from ..models.base import ModelAdapter


@dataclass
class TrainResult:
    adapter: ModelAdapter
    objective: object
    accelerator: Accelerator
    steps: int
    num_pairs: int
    started_at: float
    metrics_log: Path
    last_metrics: dict = field(default_factory=dict)
    optimizer: str = "torch.optim.AdamW"
    reference: object = None  # the live reference (training/reference.py); None when cached
    run_id: str = ""  # carried by the run's checkpoints and LoRA files (training/run_folder.py)


def lora_state(adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """The trainable tensors of every trainable module, by a stable name: the LoRA, or for full
    fine-tuning every U-Net weight."""
    return {f"{i}.{name}": p.detach().cpu().clone()
            for i, module in enumerate(adapter.trainable_modules())
            for name, p in module.named_parameters() if p.requires_grad}
