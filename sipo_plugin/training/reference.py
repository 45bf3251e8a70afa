"""The reference model of the preference objectives: live (adapter off, or a frozen copy) or cached.

``[training] reference``:

- ``auto`` / ``base``: LoRA -> the base weights with the adapter switched off (no second copy, one
  extra forward per step); full fine-tuning -> ``frozen_copy``.
- ``initial`` (LoRA started from ``network_weights``): the starting LoRA, kept as a second, frozen
  peft adapter beside the trained one and switched in for the reference forward (OneTrainer's
  EXISTING_ADAPTER). The run then starts at policy == reference (loss ln 2) and the objective
  measures how far the refined LoRA moved from the one it started as, not from the base model.
- ``frozen_copy``: a deep copy of the denoiser taken before training, frozen, on
  ``reference_device`` in ``reference_dtype`` (e.g. "cpu": the accelerator holds only the trained
  model, at the price of a CPU forward per step).
- ``cached``: a pre-pass before training stores, for every pair, the reference errors of K =
  ``reference_cache_draws`` fixed (noise, timestep) draws (seeded by (seed, pair, k)) in
  ``cache_dir/reference_errors.safetensors``; in epoch e the pair uses draw (e + pair) mod K, with
  the same noise and timestep, so training computes only the policy and no reference is ever in
  memory (full fine-tuning: no copy at all; LoRA: no second forward). The price: each pair is seen
  with only K noise/timestep draws over the whole run (data reuse, like K-fold augmentation
  instead of fresh noise each visit), and the pre-pass costs K forwards per pair up front. It
  needs cached latents (the errors are for fixed latents) and no caption dropout. The file, its
  reuse and the data the pre-pass reads: training/precompute.py; the store: data/cache.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable

import torch

from ..data.batch import PairBatch
from ..data.cache import CachedReferenceErrors, batch_conditioning, batch_latents
from ..objectives import get_objective, per_sample_error
from ..utils.seeding import seeded_generator

REFERENCE_STREAM = -2  # generator key of the cached draws: (seed, REFERENCE_STREAM, pair, k)
INITIAL_ADAPTER = "initial"  # reference = "initial": the frozen copy of the starting LoRA
REFERENCE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class AdapterOffReference:
    """LoRA: the same weights with the adapter disabled (text-encoder LoRA off too), or with the
    frozen starting adapter active instead (reference = "initial", ``adapter.reference()``)."""

    def predict(self, adapter, noisy, cond: dict, batch: PairBatch) -> torch.Tensor:
        with adapter.reference():
            ref_cond = batch_conditioning(adapter, batch) if adapter.trains_text_encoder else cond
            return adapter.predict(noisy.noisy, noisy.timesteps, ref_cond)


class FrozenCopyReference:
    """A frozen copy of the base denoiser, possibly on another device and in another dtype."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.device = next(module.parameters()).device

    def predict(self, adapter, noisy, cond: dict, batch: PairBatch) -> torch.Tensor:
        if adapter.trains_text_encoder:  # the base text encoder: its LoRA off
            with adapter.reference():
                cond = batch_conditioning(adapter, batch)
        ref_cond = {name: value.to(self.device) for name, value in cond.items()}
        with adapter.swapped_denoiser(self.module):
            pred = adapter.predict(noisy.noisy.to(self.device), noisy.timesteps.to(self.device),
                                   ref_cond)
        return pred.to(noisy.noisy.device)


class UntrainedModelReference:
    """The model itself, valid only before its first update (the cached pre-pass, full FT)."""

    def predict(self, adapter, noisy, cond: dict, batch: PairBatch) -> torch.Tensor:
        return adapter.predict(noisy.noisy, noisy.timesteps, cond)


def objective_needs_reference(config) -> bool:
    """Whether the run's objective reads the reference (``sft`` does not: no reference at all)."""
    return get_objective(config.objective.name, **config.objective.hyperparameters).needs_reference


def make_reference(config, adapter, log):
    """The live reference of a run (None for ``cached``, and when the objective needs none); call
    before anything trains."""
    t, full = config.training, config.network.finetune == "full"
    mode = t.reference if t.reference not in ("auto", "base") else (
        "frozen_copy" if full else "adapter_off")
    if not objective_needs_reference(config):
        log.info(f"reference: none ('{config.objective.name}' does not use one)")
        return None
    if mode == "cached":
        return None
    if mode == "initial":  # the starting LoRA of network_weights, kept as a frozen second adapter
        adapter.reference_adapter = INITIAL_ADAPTER
        log.info(f"reference: the starting LoRA of {config.network.network_weights}, frozen")
        return AdapterOffReference()
    if mode == "adapter_off":
        return AdapterOffReference()
    dtype = REFERENCE_DTYPES[t.reference_dtype] if t.reference_dtype else None
    module = adapter.frozen_denoiser_copy(device=t.reference_device or None, dtype=dtype)
    log.info(f"reference: a frozen copy of the {adapter.denoiser_name} on "
             f"{next(module.parameters()).device} in {next(module.parameters()).dtype}")
    return FrozenCopyReference(module)


def draw_generators(seed: int, pairs: list[int], ks: list[int]) -> list[torch.Generator]:
    """One generator per pair for its draw k: the stream the pre-pass and training share."""
    return [seeded_generator(seed, REFERENCE_STREAM, i, k) for i, k in zip(pairs, ks, strict=True)]


def pair_generators(batch: PairBatch, draws, seed: int):
    """The micro-batch's draws, with each pair's stored draw when the reference is cached."""
    if batch.reference_draw is None:
        return draws
    return replace(draws, pairs=draw_generators(seed, batch.indices.tolist(),
                                                batch.reference_draw.tolist()))


@torch.no_grad()
def compute_reference_errors(adapter, reference, items: Callable[[list[int]], PairBatch],
                             num_pairs: int, chunks: list[list[int]], *, draws: int, seed: int,
                             autocast=contextlib.nullcontext) -> CachedReferenceErrors:
    """The pre-pass: reference errors of K draws for every pair, one chunk of pairs at a time.

    ``items(indices)`` gives a batch (cached latents and conditioning) of those pairs."""
    errors = torch.zeros(num_pairs, draws, 2)
    timesteps = None  # integer (DDPM family) or float (flow: sigma * 1000), as the adapter draws
    for pairs in chunks:
        batch = items(pairs)
        latents = batch_latents(adapter, batch, None)
        for k in range(draws):
            noisy = adapter.noisy_inputs(latents, draw_generators(seed, pairs, [k] * len(pairs)))
            with autocast():
                cond = batch_conditioning(adapter, batch)
                pred = reference.predict(adapter, noisy, cond, batch)
            err = per_sample_error(pred, noisy.target).cpu()  # [2b]
            errors[pairs, k] = torch.stack(err.chunk(2), dim=1)
            if timesteps is None:
                timesteps = torch.zeros(num_pairs, draws, dtype=noisy.timesteps.dtype)
            timesteps[pairs, k] = noisy.timesteps[:len(pairs)].cpu()
    return CachedReferenceErrors(errors=errors, timesteps=timesteps)
