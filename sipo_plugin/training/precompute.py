"""Passes that run the model once before training and fill the stores of data/cache.py.

- Latents (``cache_latents``): both images of every distinct pair are encoded once by the VAE
  (sd-scripts' num_repeats lists a pair several times: it is encoded once).
- Text-encoder outputs (``cache_text_encoder_outputs``): every distinct prompt once (plus "" when
  captions are dropped). The encoders then leave the device.
- Reference errors (``reference = "cached"``): the pre-pass of training/reference.py, saved in
  ``cache_dir/reference_errors.safetensors`` and reused while its settings are unchanged.

Trade-off: a cached latent is one VAE posterior sample per image for the whole run, drawn from a
generator seeded by (seed, pair, side); live encoding draws a new sample at every visit. SD's
posterior is narrow, and sd-scripts caches the same way. In memory the cache is rebuilt each run
(deterministically); on disk (``cache_latents_to_disk``) it is one safetensors file per distinct
pair under ``cache_dir/latents``, reused when the pair's images and the settings are unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from ..data.augment import Draw
from ..data.cache import (CachedPairDataset, CachedReferenceErrors, LatentCache, PairStores,
                          PromptCache, collate_cached, data_settings, file_identity, fingerprint,
                          pair_slots)
from ..data.loader import pair_dataset
from ..data.pairs import collate_pairs
from ..utils.io import save_safetensors_atomic
from ..utils.seeding import seeded_generator
from .forward import batch_latents
from .reference import (AdapterOffReference, UntrainedModelReference, compute_reference_errors,
                        objective_needs_reference)

LATENT_STREAM = -3  # generator key of the cached VAE posterior samples: (seed, LATENT_STREAM, i, side)
REFERENCE_FILE = "reference_errors.safetensors"


def cache_dir_of(config, output_dir: Path) -> Path:
    """``cache_dir``, or ``<output_dir>/cache`` when it is empty."""
    return Path(config.data.cache_dir) if config.data.cache_dir else Path(output_dir) / "cache"


@torch.no_grad()
def build_latent_cache(adapter, dataset, records, *, seed: int, folder: Path | None,
                       settings: dict, log=None) -> LatentCache:
    """Encode both images of every distinct pair once (VAE posterior sample seeded by (seed,
    slot, side), the slot being the first index of the pair, see `pair_slots`)."""
    slots = pair_slots(records)
    cache = LatentCache(slots, entries=None if folder else {}, folder=folder)
    reused = 0
    distinct = sorted(set(slots))
    for i in distinct:
        record = records[i]
        key = fingerprint([settings, seed, file_identity(record.chosen),
                           file_identity(record.rejected), str(record.chosen_latents or "")])
        if folder is not None and cache.has_valid_file(i, key):
            reused += 1
            continue
        batch = collate_pairs([dataset[Draw(i, 0)]])
        generators = [seeded_generator(seed, LATENT_STREAM, i, side) for side in (0, 1)]
        entry = {"latents": batch_latents(adapter, batch, generators).cpu(),
                 **{f"extra.{k}": v.cpu() for k, v in batch.extras.items()}}
        if folder is None:
            cache.entries[i] = entry
        else:
            save_safetensors_atomic(entry, cache.file(i), metadata={"fingerprint": key})
    if log is not None:
        where = f"in {folder}" if folder else "in memory"
        log.info(f"cached latents of {len(distinct)} distinct pairs {where} ({reused} reused)")
    return cache


@torch.no_grad()
def build_prompt_cache(adapter, prompts: Sequence[str], chunk: int = 32, log=None) -> PromptCache:
    """Encode each distinct prompt once, ``chunk`` at a time."""
    distinct = sorted(set(prompts))
    rows: dict[str, dict[str, torch.Tensor]] = {}
    for start in range(0, len(distinct), chunk):
        part = distinct[start:start + chunk]
        cond = adapter.encode_prompts(part)
        for j, prompt in enumerate(part):
            rows[prompt] = {n: v[j:j + 1].detach().cpu() for n, v in cond.items()}
    if log is not None:
        log.info(f"cached text-encoder outputs of {len(distinct)} distinct prompts")
    return PromptCache(rows)


def encode_caches(config, adapter, records, output_dir: Path, log,
                  dataset=None) -> PairStores | None:
    """The run's latent and text-encoder stores per its [data] settings (None when nothing is
    cached), the encoders released. ``dataset``: the run's data pipeline (built when None)."""
    d = config.data
    cache_latents = d.cache_latents or d.cache_latents_to_disk
    if not (cache_latents or d.cache_text_encoder_outputs):
        return None
    cache_dir = cache_dir_of(config, output_dir)
    latents = None
    if cache_latents:
        settings = {"model": config.to_dict()["model"], "resolution": d.resolution,
                    "data": data_settings(config)}
        latents = build_latent_cache(
            adapter, dataset if dataset is not None else pair_dataset(config, records), records,
            seed=config.training.seed, settings=settings, log=log,
            folder=cache_dir / "latents" if d.cache_latents_to_disk else None)
    prompts = None
    if d.cache_text_encoder_outputs:
        dropped = [""] if getattr(d, "caption_dropout_rate", 0.0) > 0 else []
        prompts = build_prompt_cache(adapter, [r.prompt for r in records] + dropped, log=log)
    released = adapter.release_encoders(vae=cache_latents,
                                        text_encoders=d.cache_text_encoder_outputs)
    if released:
        log.info(f"outputs cached: {', '.join(released)} moved to the CPU")
    return PairStores(latents=latents, prompts=prompts)


def same_shape_chunks(latents: LatentCache, num_pairs: int, size: int) -> list[list[int]]:
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


def cached_reference_errors(config, adapter, records, stores: PairStores, dataset, cache_dir: Path,
                            accelerator, log) -> CachedReferenceErrors:
    """Load the run's cached reference errors, or compute them (before anything trains) from the
    ``stores``' latents and text-encoder outputs and save them."""
    t = config.training
    path = cache_dir / REFERENCE_FILE
    key = reference_settings(config, records)
    cached = load_reference_errors(path, key)
    if cached is not None:
        log.info(f"reference errors reused from {path}")
        return cached
    items = CachedPairDataset(dataset, records, stores.latents)

    def batch_of(pairs: list[int]):
        return collate_cached([items[Draw(i, 0)] for i in pairs], base_collate=collate_pairs,
                              prompts=stores.prompts)

    reference = (UntrainedModelReference() if config.network.finetune == "full"
                 else AdapterOffReference())
    cached = compute_reference_errors(adapter, reference, batch_of, len(records),
                                      same_shape_chunks(stores.latents, len(records),
                                                        t.train_batch_size),
                                      draws=t.reference_cache_draws, seed=t.seed,
                                      autocast=accelerator.autocast)
    if accelerator.is_main_process:
        save_safetensors_atomic({"errors": cached.errors, "timesteps": cached.timesteps}, path,
                                metadata={"fingerprint": key})
    log.info(f"reference errors of {len(records)} pairs x {t.reference_cache_draws} draws "
             f"cached in {path}")
    return cached


def prepare_caches(config, adapter, records, accelerator, log) -> PairStores | None:
    """Latent / text-encoder stores and, for reference = "cached", the reference pre-pass (run
    before a checkpoint's weights load: it needs the base model). None when nothing is cached."""
    d = config.data
    if not (d.cache_latents or d.cache_latents_to_disk or d.cache_text_encoder_outputs):
        return None  # (reference = "cached" needs cached latents: the config checks it)
    dataset = pair_dataset(config, records)  # the data pipeline the stores are filled from
    output_dir = Path(config.training.output_dir)
    stores = encode_caches(config, adapter, records, output_dir, log, dataset)
    if config.training.reference == "cached" and objective_needs_reference(config):
        stores = replace(stores, reference=cached_reference_errors(
            config, adapter, records, stores, dataset, cache_dir_of(config, output_dir),
            accelerator, log))
    return stores
