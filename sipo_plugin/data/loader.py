"""The one loader factory: a pair dataset read in a batch order, through the run's stores.

`pair_loader` builds every DataLoader of the package; `make_dataloader` gives it a run's dataset
and order from its settings, `make_pair_loader` from plain settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from .augment import PairAugmentation
from .buckets import BucketSpec, pair_bucket_hw
from .cache import CachedPairDataset, PairStores, collate_cached
from .errors import PairDataError
from .pairs import PairDataset, collate_pairs
from .records import PairRecord
from .sampler import BucketBatchSampler, PairBatchSampler, fixed_batches
from .sources import ImageReader
from .video import video_dataset


def pair_target_sizes(records: Sequence[PairRecord], spec: BucketSpec) -> list[tuple[int, int]]:
    """Each pair's (h, w) bucket, from image headers (Pick-a-Pic: one pass over the shards)."""
    problem = spec.problem()
    if problem:
        raise PairDataError(f"bucket settings: {problem}")
    resos, reader = spec.resolutions(), ImageReader()
    return [pair_bucket_hw(resos, reader.size(r.chosen), reader.size(r.rejected)) for r in records]


def image_dataset(records: Sequence[PairRecord], resolution: int, *,
                  buckets: BucketSpec | None = None,
                  augmentation: PairAugmentation | None = None) -> PairDataset:
    """Every pair at ``resolution`` squared, or, with `buckets`, at its own bucket's size."""
    target_hw = None if buckets is None else pair_target_sizes(records, buckets)
    return PairDataset(records, resolution, target_hw=target_hw, augmentation=augmentation)


def pair_dataset(config, records: Sequence[PairRecord]):
    """The run's data pipeline from its [data] settings: clips when ``num_frames`` > 0, else
    images (bucketed when ``enable_bucket``; augmentation decided per (seed, epoch, pair))."""
    d = config.data
    if d.num_frames:
        return video_dataset(config, records)
    buckets = (BucketSpec(d.resolution, d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps)
               if d.enable_bucket else None)
    augmentation = PairAugmentation(config.training.seed, d.caption_dropout_rate, d.flip_aug)
    return image_dataset(records, d.resolution, buckets=buckets, augmentation=augmentation)


def pair_batches(num_pairs: int, *, batch_size: int, seed: int, total: int, start: int = 0,
                 target_hw: Sequence[tuple[int, int]] | None = None,
                 subset: Sequence[int] | None = None):
    """Micro-batches ``start`` .. ``total`` of the run's fixed data order: `PairBatchSampler`, or
    `BucketBatchSampler` when pairs have their own sizes (``target_hw``); both are pure functions
    of (seed, position). With ``subset``, the pairs ``subset`` once each instead (`fixed_batches`:
    batches of at most ``batch_size``)."""
    if subset is not None:
        return fixed_batches(subset, batch_size, target_hw)
    if target_hw is None:
        return PairBatchSampler(num_pairs, batch_size, seed=seed, total=total, start=start)
    return BucketBatchSampler(target_hw, batch_size, seed=seed, total=total, start=start)


def pair_loader(dataset, batches, *, num_workers: int = 0,
                stores: PairStores | None = None) -> torch.utils.data.DataLoader:
    """``dataset`` (the data pipeline, keyed by `Draw`) in the order ``batches`` as `PairBatch`es;
    with ``stores``, the pairs' cached latents, text-encoder outputs and reference errors
    replace what the pipeline decodes."""
    collate = collate_pairs
    if stores is not None:
        dataset = CachedPairDataset(dataset, dataset.records, stores.latents, stores.reference)
        collate = partial(collate_cached, base_collate=collate_pairs, prompts=stores.prompts)
        if stores.in_memory:  # each worker would hold a copy of the cache
            num_workers = 0
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                       num_workers=num_workers)


def make_dataloader(config, records: Sequence[PairRecord], *, total: int, start: int = 0,
                    subset: Sequence[int] | None = None,
                    stores: PairStores | None = None) -> torch.utils.data.DataLoader:
    """The run's micro-batches ``start`` .. ``total`` (see `pair_batches`), or the pairs
    ``subset`` once each, read through ``stores`` when the run caches."""
    t = config.training
    dataset = pair_dataset(config, records)
    batches = pair_batches(len(records), batch_size=t.train_batch_size, seed=t.seed, total=total,
                           start=start, target_hw=dataset.target_hw, subset=subset)
    return pair_loader(dataset, batches, num_workers=config.data.dataloader_num_workers,
                       stores=stores)


def make_pair_loader(records: Sequence[PairRecord], *, resolution: int, batch_size: int, seed: int,
                     total: int, start: int = 0, num_workers: int = 0,
                     buckets: BucketSpec | None = None,
                     augmentation: PairAugmentation | None = None,
                     subset: Sequence[int] | None = None) -> torch.utils.data.DataLoader:
    """`make_dataloader` from plain settings, for images: every pair ``resolution`` squared, or
    with `buckets` each batch one bucket's pairs."""
    dataset = image_dataset(records, resolution, buckets=buckets, augmentation=augmentation)
    batches = pair_batches(len(records), batch_size=batch_size, seed=seed, total=total,
                           start=start, target_hw=dataset.target_hw, subset=subset)
    return pair_loader(dataset, batches, num_workers=num_workers)
