"""Stopping without losing work: SIGTERM handled like Ctrl-C, the LoRA of a run stopped by an
error saved as ``<output_name>-interrupted``, a killed run's temp files removed at the next start,
NaN/inf traced to where it came from."""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path

# utils.io's temp files: tempfile.mkstemp(prefix=".<name>.", suffix=".tmp") -> 8 random characters
_ATOMIC_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
INTERRUPTED_SUFFIX = "-interrupted"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``kill``, a closed container): stops the run like Ctrl-C does."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"signal {signal.Signals(signum).name}")


def handle_sigterm_like_sigint() -> None:
    """From now on SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread, so the
    same clean-up runs as for Ctrl-C: temp files removed, the LoRA so far saved."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def remove_stale_temp_files(output_dir: str | Path) -> list[Path]:
    """Delete the atomic-write temp files (``.<name>.<8 chars>.tmp``) a killed run left anywhere
    under ``output_dir`` (and nowhere else); returns what was removed."""
    removed = []
    root = Path(output_dir)
    if not root.is_dir():
        return removed
    for path in root.rglob(".*.tmp"):
        if path.is_file() and _ATOMIC_TEMP.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def nonfinite_loss_message(loss: float, policy_err, ref_err, metrics: dict,
                           mixed_precision: str) -> str:
    """Why the loss is NaN/inf, naming the source: the reference (base model) errors, the trained
    model's errors while the reference's are finite (divergence: the LoRA starts as a no-op, so
    the two are equal before the first update), or the objective on finite errors."""
    import torch
    precision = (f" or its {mixed_precision} computation (try mixed_precision = \"no\")"
                 if mixed_precision != "no" else "")
    base = (f"the base model's own weights{precision}; this is not a kappa or learning-rate "
            "problem: check (or re-download / re-convert) the model file")
    if not torch.isfinite(ref_err).all():
        return f"the reference errors (the base model's predictions) are NaN/inf: {base}"
    if not torch.isfinite(policy_err).all():
        return ("the trained model's errors are NaN/inf while the reference's are finite: "
                "training diverged; lower learning_rate, or use mixed_precision = \"no\"")
    return (f"loss is {loss} on finite errors (metrics: {metrics}); lower beta or learning_rate, "
            "or use mixed_precision = \"no\"")


def nonfinite_weight(module) -> str | None:
    """The name of the first parameter of ``module`` holding NaN/inf, or None."""
    import torch
    for name, p in module.named_parameters():
        values = p if p.element_size() > 1 else p.float()  # fp8 storage: no isfinite kernel
        if not torch.isfinite(values).all():
            return name
    return None
