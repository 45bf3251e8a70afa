"""The training DataLoader: dataset, (bucketed) batch sampler and collation from plain settings."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .augment import PairAugmentation
from .buckets import BucketSpec, pair_bucket_hw
from .errors import PairDataError
from .pairs import PairDataset, PairRecord, collate_pairs
from .sampler import BucketBatchSampler, PairBatchSampler, fixed_batches
from .sources import ImageReader


def pair_target_sizes(records: Sequence[PairRecord], spec: BucketSpec) -> list[tuple[int, int]]:
    """Each pair's (h, w) bucket, from image headers (Pick-a-Pic: one pass over the shards)."""
    problem = spec.problem()
    if problem:
        raise PairDataError(f"bucket settings: {problem}")
    resos, reader = spec.resolutions(), ImageReader()
    return [pair_bucket_hw(resos, reader.size(r.chosen), reader.size(r.rejected)) for r in records]


def make_pair_loader(records: Sequence[PairRecord], *, resolution: int, batch_size: int, seed: int,
                     total: int, start: int = 0, num_workers: int = 0,
                     buckets: BucketSpec | None = None,
                     augmentation: PairAugmentation | None = None,
                     subset: Sequence[int] | None = None) -> torch.utils.data.DataLoader:
    """Micro-batches ``start`` .. ``total`` of the run's fixed data order.

    Without `buckets` every pair is ``resolution`` squared (`PairBatchSampler`); with them each
    batch holds one bucket's pairs (`BucketBatchSampler`). Either way the order and the
    augmentation decisions are pure functions of (seed, position). With ``subset``, the pairs
    ``subset`` once each instead (`fixed_batches`: batches of at most ``batch_size``).
    """
    target_hw = None if buckets is None else pair_target_sizes(records, buckets)
    if subset is not None:
        sampler = fixed_batches(subset, batch_size, target_hw)
    elif buckets is None:
        sampler = PairBatchSampler(len(records), batch_size, seed=seed, total=total, start=start,
                                   with_epoch=True)
    else:
        sampler = BucketBatchSampler(target_hw, batch_size, seed=seed, total=total, start=start,
                                     with_epoch=True)
    dataset = PairDataset(records, resolution, target_hw=target_hw, augmentation=augmentation)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_pairs,
                                       num_workers=num_workers)
