"""NaN/inf during training, found without a host sync per step: the loss and reference-error
counts kept on the device (read where the loop syncs anyway), and the base weights checked once
before training (the messages: training/stopping.py)."""

from __future__ import annotations

import torch

from .stopping import nonfinite_loss_message, nonfinite_weight


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


class LossWatch:
    """Counts non-finite losses, and the steps whose reference errors were non-finite, on the
    device, so a step needs no host sync; ``check`` reads the counts where the loop syncs anyway
    (logging, checkpoints, the end of the run)."""

    REFERENCE_METRICS = ("mse/ref_w", "mse/ref_l")

    def __init__(self):
        self.bad = None
        self.bad_reference = None

    def add(self, metrics: dict) -> None:
        """``metrics`` of one micro-batch as ``train_step`` returns them (device tensors)."""
        bad = (~torch.isfinite(metrics["loss"])).to(torch.int32)
        self.bad = bad if self.bad is None else self.bad + bad
        for key in self.REFERENCE_METRICS:
            if key in metrics:  # objectives with a reference: its mean error on the pairs
                bad = (~torch.isfinite(torch.as_tensor(metrics[key]))).to(torch.int32)
                self.bad_reference = bad if self.bad_reference is None else self.bad_reference + bad

    def check(self, step: int, metrics: dict) -> None:
        if self.bad is None or int(self.bad) == 0:
            return
        if self.bad_reference is not None and int(self.bad_reference) > 0:
            # the base model, not the objective's settings (stopping.py)
            raise NonFiniteLossError(f"by step {step}: " + nonfinite_loss_message(
                float("nan"), torch.zeros(1), torch.tensor([float("nan")]), metrics, "no"))
        raise NonFiniteLossError(
            f"the loss became NaN or infinite by step {step} (metrics: {metrics}); lower "
            "learning_rate or beta, or use mixed_precision = \"no\"")


def check_base_weights(adapter) -> None:
    """NaN/inf in the base model's own weights, named before training (they would otherwise show
    up as a NaN loss that looks like a kappa or learning-rate problem)."""
    bad = nonfinite_weight(adapter.denoiser)
    if bad is not None:
        raise NonFiniteLossError(
            f"the base model's weight {adapter.denoiser_name}.{bad} holds NaN/inf: the model file "
            "is damaged (re-download or re-convert it); this is not a kappa or learning-rate problem")
