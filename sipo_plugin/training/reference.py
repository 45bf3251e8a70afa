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
from ..data.cache import CachedReferenceErrors
from ..objectives import get_objective, per_sample_error
from .forward import PairDraws, batch_conditioning, draw_generators, pair_forward

INITIAL_ADAPTER = "initial"  # reference = "initial": the frozen copy of the starting LoRA
REFERENCE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class LiveReference:
    """A reference model run on the batch: ``errors`` are its per-sample errors, without grad."""

    def errors(self, adapter, noisy, cond: dict, batch: PairBatch,
               autocast=contextlib.nullcontext) -> torch.Tensor:
        """[2B] ``mean((f_ref(x_t, t, c) - target)^2)`` for the policy's own inputs."""
        with torch.no_grad(), autocast():
            pred = self.predict(adapter, noisy, cond, batch)
        return per_sample_error(pred, noisy.target)

    def predict(self, adapter, noisy, cond: dict, batch: PairBatch) -> torch.Tensor:
        raise NotImplementedError


class CachedReference:
    """``cached``: the reference errors the pre-pass stored for the pair's draw ride in the batch;
    no reference model runs during training."""

    def errors(self, adapter, noisy, cond: dict, batch: PairBatch, autocast=None) -> torch.Tensor:
        return batch.reference_errors


class AdapterOffReference(LiveReference):
    """LoRA: the same weights with the adapter disabled (text-encoder LoRA off too), or with the
    frozen starting adapter active instead (reference = "initial", ``adapter.reference()``)."""

    def predict(self, adapter, noisy, cond: dict, batch: PairBatch) -> torch.Tensor:
        with adapter.reference():
            ref_cond = batch_conditioning(adapter, batch) if adapter.trains_text_encoder else cond
            return adapter.predict(noisy.noisy, noisy.timesteps, ref_cond)


class FrozenCopyReference(LiveReference):
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


class UntrainedModelReference(LiveReference):
    """The model itself, valid only before its first update (the cached pre-pass, full FT)."""

    def predict(self, adapter, noisy, cond: dict, batch: PairBatch) -> torch.Tensor:
        return adapter.predict(noisy.noisy, noisy.timesteps, cond)


def objective_needs_reference(config) -> bool:
    """Whether the run's objective reads the reference (``sft`` does not: no reference at all)."""
    return get_objective(config.objective.name, **config.objective.hyperparameters).needs_reference


def reference_mode(config) -> str:
    """``adapter_off``, ``frozen_copy``, ``initial`` or ``cached``: ``auto`` / ``base`` resolved
    (LoRA: adapter off; full fine-tuning: a frozen copy)."""
    t = config.training
    if t.reference not in ("auto", "base"):
        return t.reference
    return "frozen_copy" if config.network.finetune == "full" else "adapter_off"


def make_reference(config, adapter, log, *, live: bool = False):
    """The run's reference, chosen here and nowhere else; call before anything trains (a frozen
    copy is then the base, and the starting LoRA is kept before the trained one is added).

    None when the objective needs none. ``live=True`` (``--analyze``: every objective at
    stratified timesteps, which no cache holds) always gives a model: ``cached`` becomes what
    its pre-pass ran (LoRA: adapter off; full fine-tuning: a frozen copy of the base)."""
    mode = reference_mode(config)
    if not (live or objective_needs_reference(config)):
        log.info(f"reference: none ('{config.objective.name}' does not use one)")
        return None
    if mode == "cached":
        if not live:
            return CachedReference()
        mode = "frozen_copy" if config.network.finetune == "full" else "adapter_off"
    if mode == "initial":  # the starting LoRA of network_weights, kept as a frozen second adapter
        adapter.reference_adapter = INITIAL_ADAPTER
        log.info(f"reference: the starting LoRA of {config.network.network_weights}, frozen")
        return AdapterOffReference()
    if mode == "adapter_off":
        return AdapterOffReference()
    t = config.training
    dtype = REFERENCE_DTYPES[t.reference_dtype] if t.reference_dtype else None
    module = adapter.frozen_denoiser_copy(device=t.reference_device or None, dtype=dtype)
    log.info(f"reference: a frozen copy of the {adapter.denoiser_name} on "
             f"{next(module.parameters()).device} in {next(module.parameters()).dtype}")
    return FrozenCopyReference(module)


def live_reference(reference):
    """The reference model a run keeps (None for ``cached`` and for none)."""
    return None if isinstance(reference, CachedReference) else reference


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
        for k in range(draws):
            streams = PairDraws(images=[], pairs=draw_generators(seed, pairs, [k] * len(pairs)))
            out = pair_forward(adapter, batch, streams, reference=reference, policy=False,
                               autocast=autocast)
            errors[pairs, k] = torch.stack(out.reference.cpu().chunk(2), dim=1)  # [2b] -> [b, 2]
            if timesteps is None:
                timesteps = torch.zeros(num_pairs, draws, dtype=out.timesteps.dtype)
            timesteps[pairs, k] = out.timesteps[:len(pairs)].cpu()
    return CachedReferenceErrors(errors=errors, timesteps=timesteps)
