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
  needs cached latents (the errors are for fixed latents) and no caption dropout.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ..data.batch import PairBatch
from ..data.cache import (batch_conditioning, batch_latents, data_settings, file_identity,
                          fingerprint)
from ..objectives import get_objective, per_sample_error
from ..utils.io import save_safetensors_atomic
from ..utils.seeding import seeded_generator

REFERENCE_STREAM = -2  # generator key of the cached draws: (seed, REFERENCE_STREAM, pair, k)
REFERENCE_FILE = "reference_errors.safetensors"
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


def draw_index(pair: int, epoch: int, draws: int) -> int:
    """Which of a pair's K cached draws epoch e uses: k = (e + pair) mod K (cycles every K epochs;
    the pair offset spreads the draws of one batch)."""
    return (epoch + pair) % draws


def draw_generators(seed: int, pairs: list[int], ks: list[int]) -> list[torch.Generator]:
    """One generator per pair for its draw k: the stream the pre-pass and training share."""
    return [seeded_generator(seed, REFERENCE_STREAM, i, k) for i, k in zip(pairs, ks, strict=True)]


@dataclass
class CachedReferenceErrors:
    """errors [N, K, 2] (winner, loser) and timesteps [N, K] of K draws for each of N pairs."""

    errors: torch.Tensor
    timesteps: torch.Tensor

    @property
    def draws(self) -> int:
        return self.errors.shape[1]

    def item(self, pair: int, epoch: int) -> dict[str, torch.Tensor]:
        """What a dataset item carries: the draw index and its errors [2] (winner, loser)."""
        k = draw_index(pair, epoch, self.draws)
        return {"reference_draw": torch.tensor([k]), "reference_errors": self.errors[pair, k]}

    def calibration_sample(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every cached draw as [2N] errors (winners first) and [2N] timesteps, per draw."""
        errors = [torch.cat([self.errors[:, k, 0], self.errors[:, k, 1]]) for k in range(self.draws)]
        timesteps = [torch.cat([self.timesteps[:, k]] * 2) for k in range(self.draws)]
        return errors, timesteps


def pair_generators(batch: PairBatch, draws, seed: int):
    """The micro-batch's draws, with each pair's stored draw when the reference is cached."""
    if batch.reference_draw is None:
        return draws
    return replace(draws, pairs=draw_generators(seed, batch.indices.tolist(),
                                                batch.reference_draw.tolist()))


@torch.no_grad()
def compute_reference_errors(adapter, reference, items: Callable[[list[int]], PairBatch], num_pairs: int,
                             chunks: list[list[int]], *, draws: int, seed: int,
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


def same_shape_chunks(latents, num_pairs: int, size: int) -> list[list[int]]:
    """Consecutive pair indices in chunks of at most ``size`` whose latents share one shape
    (aspect-ratio buckets give pairs different shapes)."""
    chunks: list[list[int]] = []
    shape = None
    for i in range(num_pairs):
        this = tuple(latents[i]["latents"].shape)
        if chunks and this == shape and len(chunks[-1]) < size:
            chunks[-1].append(i)
        else:
            chunks.append([i])
            shape = this
    return chunks


def reference_settings(config, records) -> str:
    """The fingerprint a cached reference file must match to be reused."""
    return fingerprint({"model": config.to_dict()["model"], "data": data_settings(config),
                        "seed": config.training.seed,
                        "draws": config.training.reference_cache_draws,
                        "mixed_precision": config.training.mixed_precision,
                        "pairs": [[r.prompt, file_identity(r.chosen), file_identity(r.rejected)]
                                  for r in records]})


def load_reference_errors(path: Path, key: str) -> CachedReferenceErrors | None:
    """The cached errors at ``path`` when they were made with these settings, else None."""
    try:
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != key:
                return None
            return CachedReferenceErrors(errors=f.get_tensor("errors"),
                                         timesteps=f.get_tensor("timesteps"))
    except Exception:  # missing, truncated or foreign: rebuild
        return None


def cached_reference_errors(config, adapter, records, data_cache, loader, cache_dir: Path,
                            accelerator, log) -> CachedReferenceErrors:
    """Load the run's cached reference errors, or compute them (before anything trains) and save."""
    t = config.training
    path = cache_dir / REFERENCE_FILE
    key = reference_settings(config, records)
    cached = load_reference_errors(path, key)
    if cached is not None:
        log.info(f"reference errors reused from {path}")
        return cached
    dataset = data_cache.dataset(loader)
    collate = data_cache.wrap(loader).collate_fn

    def items(pairs: list[int]) -> PairBatch:
        return collate([dataset[(i, 0)] for i in pairs])

    reference = (UntrainedModelReference() if config.network.finetune == "full"
                 else AdapterOffReference())
    cached = compute_reference_errors(adapter, reference, items, len(records),
                                      same_shape_chunks(data_cache.latents, len(records),
                                                        t.train_batch_size),
                                      draws=t.reference_cache_draws, seed=t.seed,
                                      autocast=accelerator.autocast)
    if accelerator.is_main_process:
        save_safetensors_atomic({"errors": cached.errors, "timesteps": cached.timesteps}, path,
                                metadata={"fingerprint": key})
    log.info(f"reference errors of {len(records)} pairs x {t.reference_cache_draws} draws "
             f"cached in {path}")
    return cached
