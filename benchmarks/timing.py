"""What the training benchmarks share: the wall and CPU time of every step of the trainer's own
loop, and the process's peak memory."""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class StepTimes:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # this process's CPU time: steady under load


@contextlib.contextmanager
def timed_train_steps() -> Iterator[StepTimes]:
    """Time every ``sipo_plugin.training.loop.train_step`` call made inside the block."""
    from sipo_plugin.training import loop
    times = StepTimes()
    original = loop.train_step

    def timed_step(*args, **kwargs):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = original(*args, **kwargs)
        times.wall.append(time.perf_counter() - start)
        times.cpu.append(time.process_time() - cpu_start)
        return out

    loop.train_step = timed_step
    try:
        yield times
    finally:
        loop.train_step = original


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trained_parameters(adapter) -> int:
    """How many parameters the run trains (LoRA or full), over every trainable module."""
    return sum(p.numel() for m in adapter.trainable_modules() for p in m.parameters()
               if p.requires_grad)
