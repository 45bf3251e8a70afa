"""The one forward path of a pair batch: its policy and reference errors.

Every pass over pairs goes through :func:`pair_forward`: the training step, kappa calibration
(no policy), the cached-reference pre-pass (no policy) and ``--analyze`` (stratified timesteps).
One micro-batch of B pairs is 2B samples, winners first; a pair shares its prompt, noise and
timestep:

    encode the images (or read the latent cache) -> conditioning (or the text-encoder cache)
      -> one noise and one timestep per pair -> policy prediction -> policy errors [2B]
      -> reference errors [2B] (the reference of training/reference.py: adapter off, a frozen
         copy, the starting LoRA, or the errors a cached pre-pass stored in the batch)

The random streams are keyed by (seed, step, micro-batch, pair index), so a pair's draws are the
same whether its batch runs in one process or is split across several.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..data.batch import PairBatch
from ..models.base import Conditioning, NoisyBatch
from ..objectives import per_sample_error
from ..utils.seeding import seeded_generator

REFERENCE_STREAM = -2  # generator key of the cached draws: (seed, REFERENCE_STREAM, pair, k)


def batch_latents(adapter, batch: PairBatch, generators) -> torch.Tensor:
    """[2B, ...] latents: the cached ones when the batch carries them, else the VAE encodes."""
    if batch.latents is not None:
        return batch.latents.to(adapter.device)
    return adapter.encode_images(batch.pixel_values, generators)


def batch_conditioning(adapter, batch: PairBatch) -> Conditioning:
    """[2B] conditioning: cached text-encoder outputs when the batch carries them, else encoded."""
    if batch.cond is not None:
        cond = {name: value.to(adapter.device) for name, value in batch.cond.items()}
    else:
        cond = adapter.encode_prompts(batch.prompts)
    return adapter.pair_conditioning(cond, batch)


def draw_generators(seed: int, pairs: list[int], ks: list[int]) -> list[torch.Generator]:
    """One generator per pair for its cached draw k: the stream the pre-pass and training share."""
    return [seeded_generator(seed, REFERENCE_STREAM, i, k) for i, k in zip(pairs, ks, strict=True)]


@dataclass
class PairDraws:
    """The random streams of one micro-batch, keyed by (seed, step, micro-batch, pair index):
    one per pair for its two VAE posterior samples (winner, then loser; none when the latents are
    cached) and one per pair for its noise and timestep. ``images`` / ``pairs`` may also be one
    shared generator (``--analyze``)."""

    images: list[torch.Generator] | torch.Generator  # [2B], winners first, or []
    pairs: list[torch.Generator] | torch.Generator  # [B]

    @classmethod
    def for_batch(cls, seed: int, step: int, micro: int, indices, *,
                  images: bool = True) -> "PairDraws":
        """``indices``: the batch's pair indices (a list, or a CPU tensor: no device read)."""
        ids = indices.tolist() if torch.is_tensor(indices) else list(indices)
        image_streams = [seeded_generator(seed, step, micro, i, 0) for i in ids] if images else []
        return cls(images=image_streams * 2,
                   pairs=[seeded_generator(seed, step, micro, i, 2) for i in ids])


def batch_draws(batch: PairBatch, seed: int, step: int, micro: int) -> PairDraws:
    """The streams a micro-batch uses, and no others: no VAE streams when its latents are cached,
    the pair's stored draw when its reference errors are (generators cost tens of us each).
    The indices and draws are read on the host: the batch keeps them on the CPU."""
    if batch.reference_draw is not None:
        return PairDraws(images=[], pairs=draw_generators(seed, batch.indices.tolist(),
                                                          batch.reference_draw.tolist()))
    return PairDraws.for_batch(seed, step, micro, batch.indices, images=batch.latents is None)


@dataclass
class PairForward:
    """One micro-batch's errors, [2B] fp32 each, winners first."""

    policy: torch.Tensor | None  # with grad through the policy prediction; None: not run
    reference: torch.Tensor | None  # no grad; None: no reference asked for
    noisy: NoisyBatch  # the inputs both predictions saw (timesteps [2B], halves equal)
    cond: Conditioning  # [2B]

    @property
    def timesteps(self) -> torch.Tensor:
        return self.noisy.timesteps


def predict_policy(adapter, noisy: NoisyBatch, cond: Conditioning) -> torch.Tensor:
    """The trained model's prediction: the one place the policy runs (a wrapper such as
    accelerate's DDP module would be called here)."""
    return adapter.predict(noisy.noisy, noisy.timesteps, cond)


NoiseFn = Callable[[torch.Tensor, object], NoisyBatch]  # (latents [2B], pair streams) -> inputs


def pair_forward(adapter, batch: PairBatch, draws: PairDraws, *, reference=None, policy: bool = True,
                 autocast=contextlib.nullcontext, noise: NoiseFn | None = None) -> PairForward:
    """Policy errors ``m = mean((f_theta(x_t, t, c) - target)^2)`` and reference errors
    ``r = mean((f_ref(x_t, t, c) - target)^2)`` of the batch's 2B samples.

    ``reference``: a reference of training/reference.py (its ``errors``), or None for none;
    ``policy=False`` runs no policy (calibration, the cached pre-pass: before any training);
    ``autocast``: the mixed-precision context of both predictions; ``noise``: how the noisy
    inputs are made (default ``adapter.noisy_inputs``: one noise and timestep per pair)."""
    latents = batch_latents(adapter, batch, draws.images)
    cond = batch_conditioning(adapter, batch)
    noisy = (noise or adapter.noisy_inputs)(latents, draws.pairs)
    policy_err = None
    if policy:
        with autocast():
            pred = predict_policy(adapter, noisy, cond)
        policy_err = per_sample_error(pred, noisy.target)
    ref_err = (reference.errors(adapter, noisy, cond, batch, autocast)
               if reference is not None else None)
    return PairForward(policy=policy_err, reference=ref_err, noisy=noisy, cond=cond)
