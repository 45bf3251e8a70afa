"""Activation memory of a training step, from one forward pass on the meta device.

``saved_activation_bytes`` runs the policy forward of 2B images (winners and losers) with tensors
on the meta device (no memory, no arithmetic) and sums the distinct storages autograd saves for
the backward pass (``torch.autograd.graph.saved_tensors_hooks``), parameters and buffers left out.
Attention is counted as a fused kernel keeps it (flash / memory-efficient SDPA, what CUDA and this
torch's CPU SDPA run): q, k, v, the output and a float32 log-sum-exp per query, never the L x L
score matrix (the meta device would otherwise take the math path).

With gradient checkpointing the denoiser's checkpointed blocks keep only their inputs; the
backward pass recomputes one block at a time, whose saved tensors exist together with the rest:
    S_ckpt = saved outside the blocks + the blocks' inputs + max over blocks of a block's saved.

The peak memory a step adds over the static weights, gradients and optimizer states is then
    activations = slope * S + intercept
with (slope, intercept) fitted on measured peaks (``CALIBRATION``; benchmarks/calibrate_activations.py
measures them and prints the fit and its error).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

# activations = slope * saved + intercept_bytes, fitted by benchmarks/calibrate_activations.py on
# 12 CPU measurements (fp32 LoRA steps, tiny and mid-size SD1.5 layout, 64-256 px, 1-2 pairs, with
# and without checkpointing): within 7% from 40 MiB up, 25% (7.7 MiB) at the smallest (README)
CALIBRATION = {"slope": 1.063, "intercept_bytes": 642_262}


@dataclass
class SavedTally:
    """Distinct storages saved for backward (bytes), ignoring ``excluded`` storages."""

    excluded: set
    seen: set
    total: int = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self.excluded and key not in self.seen:
            self.seen.add(key)
            self.total += tensor.untyped_storage().nbytes()
        return tensor


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


class _FusedAttention(torch.autograd.Function):
    """What a fused SDPA kernel saves: q, k, v, out and a float32 log-sum-exp [..., L]."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(query.shape[:-1] + value.shape[-1:])
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the meta count never runs backward
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    return _FusedAttention.apply(query, key, value)


@contextlib.contextmanager
def fused_attention_on_meta() -> Iterator[None]:
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _weights_of(modules: list[torch.nn.Module]) -> set:
    return {_storage_key(t) for m in modules for t in (*m.parameters(), *m.buffers())}


@dataclass(frozen=True)
class SavedBytes:
    plain: int  # saved for backward without gradient checkpointing
    checkpointed: int  # S_ckpt (see the module docstring)


def saved_activation_bytes(forward, modules: list[torch.nn.Module],
                           denoiser: torch.nn.Module) -> SavedBytes:
    """S and S_ckpt of ``forward()`` (a meta-device policy forward); ``modules``: every module whose
    weights the forward reads (their storages are weights, not activations)."""
    excluded = _weights_of(modules)
    plain = _count(forward, excluded)
    blocks: list[int] = []
    outside = SavedTally(excluded, set())

    def counting_checkpoint(module, *args):
        for arg in args:  # checkpoint keeps the block's inputs
            if isinstance(arg, torch.Tensor):
                outside.pack(arg)
        inner = SavedTally(excluded, set())
        with torch.autograd.graph.saved_tensors_hooks(inner.pack, _unpack):
            out = module(*args)
        blocks.append(inner.total)
        return out

    supports = getattr(denoiser, "_supports_gradient_checkpointing", False)
    if not supports:
        return SavedBytes(plain, plain)
    was_on = denoiser.is_gradient_checkpointing
    denoiser.enable_gradient_checkpointing(counting_checkpoint)
    try:
        with torch.autograd.graph.saved_tensors_hooks(outside.pack, _unpack), fused_attention_on_meta():
            forward()
    finally:
        denoiser.disable_gradient_checkpointing()
        if was_on:
            denoiser.enable_gradient_checkpointing()
    return SavedBytes(plain, outside.total + max(blocks, default=0))


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _count(forward, excluded: set) -> int:
    tally = SavedTally(excluded, set())
    with torch.autograd.graph.saved_tensors_hooks(tally.pack, _unpack), fused_attention_on_meta():
        forward()
    return tally.total


def activation_bytes(saved: int, calibration: dict | None = None) -> int:
    """slope * S + intercept (bytes; ``CALIBRATION`` unless given)."""
    c = calibration or CALIBRATION
    return max(0, int(c["slope"] * saved + c["intercept_bytes"]))
