"""Latent and text-encoder-output caches (sd-scripts' cache_latents / cache_text_encoder_outputs).

Before training, both images of every pair are encoded once by the VAE and every distinct prompt
once by the text encoders (plus "" when captions are dropped); the encoders can then leave the
device. Batches from the cache carry ``latents`` ([2B, ...], winners first) instead of
``pixel_values`` and ``cond`` (the adapter's Conditioning, [B, ...]) instead of ``prompts``, plus
the data pipeline's other per-pair tensors (SDXL's size and crop ids). Nothing here assumes a
latent rank: images give [C, H, W] per sample, video [C, F, H, W] or [F, C, H, W].

Trade-off: a cached latent is one VAE posterior sample per image for the whole run, drawn from a
generator seeded by (seed, pair, side); live encoding draws a new sample at every visit. SD's
posterior is narrow, and sd-scripts caches the same way. In memory the cache is rebuilt each run
(deterministically); on disk (``cache_latents_to_disk``) it is one safetensors file per pair under
``cache_dir/latents``, reused when the pair's images and the settings are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors import safe_open

from ..utils.io import save_safetensors_atomic
from ..utils.seeding import seeded_generator
from .batch import PairBatch

LATENT_STREAM = -3  # generator key of the cached VAE posterior samples: (seed, LATENT_STREAM, i, side)


def batch_latents(adapter, batch: PairBatch, generators) -> torch.Tensor:
    """[2B, ...] latents: the cached ones when the batch carries them, else the VAE encodes."""
    if batch.latents is not None:
        return batch.latents.to(adapter.device)
    return adapter.encode_images(batch.pixel_values, generators)


def batch_conditioning(adapter, batch: PairBatch) -> dict[str, torch.Tensor]:
    """[2B] conditioning: cached text-encoder outputs when the batch carries them, else encoded."""
    if batch.cond is not None:
        cond = {name: value.to(adapter.device) for name, value in batch.cond.items()}
    else:
        cond = adapter.encode_prompts(batch.prompts)
    return adapter.pair_conditioning(cond, batch)


def file_identity(source) -> list:
    """What tells a changed image: its name (a path, or a parquet cell's shard, row and column),
    and the size and modification time of the file holding it."""
    stat = Path(getattr(source, "file", source)).stat()  # a ParquetImage lives in its shard
    return [str(source), stat.st_size, stat.st_mtime_ns]


def fingerprint(value) -> str:
    """sha256 of a JSON-able value (settings, file identities)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def data_settings(config) -> dict:
    """The [data] keys that change what a pair encodes to (not the caching or loader options):
    part of every cache fingerprint."""
    return {k: v for k, v in config.to_dict()["data"].items()
            if not k.startswith("cache") and k != "dataloader_num_workers"}


def stack_pair_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-pair tensors -> batch layout: 2 rows per pair (winner, loser) -> [2B, ...] winners
    first; 1 row per pair -> [B, ...]."""
    if rows[0].shape[0] == 2:
        return torch.cat([torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])])
    return torch.cat(list(rows))


class LatentCache:
    """Per pair i: ``latents`` [2, ...] (winner, loser) and ``extra.<key>`` tensors, in memory or
    in ``folder/<i>.safetensors``."""

    def __init__(self, entries: dict[int, dict] | None = None, folder: Path | None = None):
        self.entries, self.folder = entries, folder

    def file(self, index: int) -> Path:
        return self.folder / f"{index:08d}.safetensors"

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.entries is not None:
            return self.entries[index]
        with safe_open(self.file(index), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def has_valid_file(self, index: int, key: str) -> bool:
        try:
            with safe_open(self.file(index), framework="pt") as f:
                return (f.metadata() or {}).get("fingerprint") == key
        except Exception:  # missing, truncated or foreign: rebuild it
            return False


@torch.no_grad()
def build_latent_cache(adapter, dataset, collate: Callable, records, *, seed: int,
                       folder: Path | None, settings: dict, log=None) -> LatentCache:
    """Encode both images of every pair once (VAE posterior sample seeded by (seed, pair, side))."""
    cache = LatentCache(entries=None if folder else {}, folder=folder)
    reused = 0
    for i, record in enumerate(records):
        key = fingerprint([settings, seed, file_identity(record.chosen),
                           file_identity(record.rejected), str(record.chosen_latents or "")])
        if folder is not None and cache.has_valid_file(i, key):
            reused += 1
            continue
        batch = collate([dataset[i]])
        generators = [seeded_generator(seed, LATENT_STREAM, i, side) for side in (0, 1)]
        entry = {"latents": batch_latents(adapter, batch, generators).cpu(),
                 **{f"extra.{k}": v.cpu() for k, v in batch.extras.items()}}
        if folder is None:
            cache.entries[i] = entry
        else:
            save_safetensors_atomic(entry, cache.file(i), metadata={"fingerprint": key})
    if log is not None:
        where = f"in {folder}" if folder else "in memory"
        log.info(f"cached latents of {len(records)} pairs {where} ({reused} reused)")
    return cache


class PromptCache:
    """Text-encoder outputs by prompt: each a Conditioning of [1, ...] tensors on the CPU."""

    def __init__(self, rows: dict[str, dict[str, torch.Tensor]]):
        self.rows = rows

    def lookup(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """B prompts -> Conditioning [B, ...]."""
        missing = [p for p in prompts if p not in self.rows]
        if missing:
            raise ValueError(f"prompt {missing[0]!r} is not in the text-encoder cache (the data "
                             "changed after caching); rerun to rebuild the cache")
        names = self.rows[prompts[0]].keys()
        return {n: torch.cat([self.rows[p][n] for p in prompts]) for n in names}


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


class EpochTaggedBatches(torch.utils.data.Sampler):
    """The wrapped batch sampler's batches as [(i, epoch), ...]: a sampler built ``with_epoch``
    gives its own `Draw`s; bare indices get the epoch of their position in the run's stream
    (``start`` / ``per_epoch``), a pure function of the position, so resumed runs tag alike."""

    def __init__(self, batch_sampler, num_pairs: int, batch_size: int):
        self.inner = batch_sampler
        self.start = getattr(batch_sampler, "start", 0)
        self.per_epoch = getattr(batch_sampler, "per_epoch", max(1, num_pairs // batch_size))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for n, indices in enumerate(self.inner):
            epoch = (self.start + n) // self.per_epoch
            yield [(int(i[0]), int(i[1])) if isinstance(i, tuple) else (int(i), epoch)
                   for i in indices]

    def __len__(self) -> int:
        return len(self.inner)


class CachedPairDataset(torch.utils.data.Dataset):
    """Items by (pair index, epoch): cached latents (or the data pipeline's decoded item), the
    caption, and, with a cached reference, the pair's stored draw for that epoch."""

    def __init__(self, base_dataset, records, latents: LatentCache | None, reference=None):
        self.base, self.records = base_dataset, records
        self.latents, self.reference = latents, reference

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        # the data pipeline's per-(seed, epoch, pair) augmentation decisions, when it has them
        augmentation = getattr(self.base, "augmentation", None)
        if self.latents is None:
            item = dict(self.base[key] if augmentation is not None else self.base[index])
        else:
            record = self.records[index]
            drop_caption = augmentation is not None and augmentation.decide(epoch, index)[0]
            item = {"index": index, "prompt": "" if drop_caption else record.prompt,
                    "weight": record.weight, **self.latents[index]}
        if self.reference is not None:
            item.update(self.reference.item(index, epoch))
        return item


def collate_cached(items: Sequence[dict], *, base_collate: Callable,
                   prompts: PromptCache | None) -> PairBatch:
    """Items -> a `PairBatch`: ``latents`` [2B, ...] winners first (or the base collate's pixels),
    ``cond`` [B, ...] from the prompt cache (or ``prompts``), weights, indices, extras, and the
    cached reference's errors [2B] and draws [B] when the items carry them."""
    if "latents" in items[0]:
        batch = PairBatch(
            latents=stack_pair_rows([item["latents"] for item in items]),
            prompts=[item["prompt"] for item in items],
            weights=torch.tensor([float(item["weight"]) for item in items]),
            indices=torch.tensor([int(item["index"]) for item in items]),
            extras={key[len("extra."):]: stack_pair_rows([item[key] for item in items])
                    for key in items[0] if key.startswith("extra.")})
    else:
        batch = base_collate([{k: v for k, v in item.items() if not k.startswith("reference_")}
                              for item in items])
    if "reference_errors" in items[0]:
        batch = replace(batch, **{key: stack_pair_rows([item[key] for item in items])
                                  for key in ("reference_errors", "reference_draw")})
    if prompts is not None:
        batch = replace(batch, cond=prompts.lookup(batch.prompts), prompts=None)
    return batch


@dataclass
class DataCache:
    """What is cached for a run; ``wrap`` turns a data-pipeline loader into a cached one."""

    records: list
    latents: LatentCache | None
    prompts: PromptCache | None
    batch_size: int
    reference: object = None  # training.reference.CachedReferenceErrors, set after the pre-pass

    def dataset(self, loader) -> CachedPairDataset:
        return CachedPairDataset(loader.dataset, self.records, self.latents, self.reference)

    def wrap(self, loader) -> torch.utils.data.DataLoader:
        """The loader's batches (same order, same sampler) read from the caches."""
        return torch.utils.data.DataLoader(
            self.dataset(loader),
            batch_sampler=EpochTaggedBatches(loader.batch_sampler, len(self.records), self.batch_size),
            collate_fn=partial(collate_cached, base_collate=loader.collate_fn, prompts=self.prompts),
            # latents in memory need no workers (each would hold a copy of the cache)
            num_workers=0 if self.latents is not None and self.latents.folder is None
            else loader.num_workers)


def cache_dir_of(config, output_dir: Path) -> Path:
    """``cache_dir``, or ``<output_dir>/cache`` when it is empty."""
    return Path(config.data.cache_dir) if config.data.cache_dir else Path(output_dir) / "cache"


def build_data_cache(config, adapter, records, loader, output_dir: Path, log) -> DataCache | None:
    """The run's caches per its [data] settings (None when nothing is cached), encoders released.

    ``loader``: a loader of the data pipeline (its dataset and collate make the cached items)."""
    d = config.data
    cache_latents = d.cache_latents or d.cache_latents_to_disk
    if not (cache_latents or d.cache_text_encoder_outputs):
        return None
    cache_dir = cache_dir_of(config, output_dir)
    latents = None
    if cache_latents:
        settings = {"model": config.to_dict()["model"], "resolution": d.resolution,
                    "data": data_settings(config)}
        latents = build_latent_cache(adapter, loader.dataset, loader.collate_fn, records,
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
    return DataCache(records, latents, prompts, config.training.train_batch_size)
