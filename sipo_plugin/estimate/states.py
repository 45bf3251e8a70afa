"""Exact bytes of the trained parameters' gradients and optimizer states, from their shapes and
dtypes alone (the parameters may live on the meta device), as each optimizer allocates them.

Per trained parameter p with n = p.numel() elements of s = p.element_size() bytes:

- gradient: n * s (the gradient has the parameter's dtype);
- torch AdamW: exp_avg + exp_avg_sq = 2 n s, plus a 4-byte float32 ``step`` scalar (host memory,
  unless fused / capturable);
- bitsandbytes AdamW8bit: n >= min_8bit_size (4096): two uint8 states (2 n) and two float32 absmax
  per block of 256 (8 ceil(n / 256)); smaller: two float32 states (8 n); the two 256-entry
  quantization maps are shared by every parameter (2 KiB once);
- bitsandbytes Lion / Lion8bit: one state (4 n, or n + 4 ceil(n / 256) and one 1 KiB map);
- transformers Adafactor: a >= 2-D parameter keeps factored second moments, one per row and one
  per column of its last two dims (shape[:-1] and shape[:-2] + shape[-1:]); 1-D ones a full
  exp_avg_sq; with beta1 also a full exp_avg; states in float32 (it upcasts fp16 / bf16
  gradients first), plus a float32 RMS scalar per parameter;
- Prodigy (prodigyopt): s and p0 (n / slice_p elements each; p0 is one element when the
  parameter starts at zero, as a fresh LoRA's up matrix does), exp_avg (beta1 > 0) and exp_avg_sq.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BNB_BLOCK = 256  # bitsandbytes' blockwise quantization block (8-bit states)
BNB_QMAP_BYTES = 256 * 4  # one float32 quantization map


@dataclass(frozen=True)
class ParamShape:
    """What the estimate needs of a trained parameter."""

    shape: tuple[int, ...]
    element_size: int  # bytes per element of the parameter (and its gradient)
    starts_at_zero: bool = False  # a fresh LoRA up matrix (Prodigy keeps no p0 copy of it)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def gradient_bytes(params: list[ParamShape]) -> int:
    """sum_p n_p * s_p."""
    return sum(p.numel * p.element_size for p in params)


def _bnb_8bit_state(n: int) -> int:
    """One 8-bit blockwise state: n uint8 + 4 ceil(n / 256) bytes of float32 absmax."""
    return n + 4 * math.ceil(n / BNB_BLOCK)


def _adafactor_state(p: ParamShape, element_size: int, beta1) -> int:
    if len(p.shape) >= 2:
        rows, cols = math.prod(p.shape[:-1]), math.prod(p.shape[:-2]) * p.shape[-1]
        second = rows + cols
    else:
        second = p.numel
    return (second + (p.numel if beta1 is not None else 0)) * element_size


def optimizer_state_bytes(params: list[ParamShape], optimizer_type: str, kwargs: dict
                          ) -> tuple[int, int]:
    """(device bytes, host bytes) of the optimizer's state after its first step. ``kwargs``: the
    optimizer's keyword arguments as the trainer passes them (training.memory.optimizer_kwargs)."""
    device = host = 0
    if optimizer_type == "AdamW":
        device = sum(2 * p.numel * p.element_size for p in params)
        host = 4 * len(params)
    elif optimizer_type in ("AdamW8bit", "Lion8bit", "Lion"):
        states = 1 if optimizer_type.startswith("Lion") else 2
        eight_bit = optimizer_type.endswith("8bit")
        min_size = kwargs.get("min_8bit_size", 4096)
        quantized = [p for p in params if eight_bit and p.numel >= min_size]
        device = sum(states * _bnb_8bit_state(p.numel) for p in quantized)
        device += sum(states * 4 * p.numel for p in params if p not in quantized)
        device += states * BNB_QMAP_BYTES if quantized else 0
        if kwargs.get("max_unorm", 0.0) > 0:
            device += 4 * len(params)
    elif optimizer_type == "Adafactor":
        device = sum(_adafactor_state(p, 4, kwargs.get("beta1")) + 4 for p in params)
    elif optimizer_type == "Prodigy":
        beta1 = kwargs.get("betas", (0.9, 0.999))[0]
        slice_p = kwargs.get("slice_p", 1)
        for p in params:
            sliced = math.ceil(p.numel / slice_p)
            p0 = 1 if p.starts_at_zero else sliced
            device += (sliced + p0 + p.numel * (2 if beta1 > 0 else 1)) * p.element_size
    else:
        raise ValueError(f"--estimate: unknown optimizer_type '{optimizer_type}'")
    return device, host


def effective_optimizer(optimizer_type: str) -> str:
    """What the trainer builds: AdamW8bit falls back to torch AdamW without bitsandbytes
    (training.memory)."""
    import importlib.util
    if optimizer_type == "AdamW8bit" and importlib.util.find_spec("bitsandbytes") is None:
        return "AdamW"
    return optimizer_type
