"""Data order as a pure function of (seed, position), so a resumed run sees the same batches.

Every sampler yields batches of `Draw` (pair index, epoch): the one kind of dataset key."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Iterator

import torch

from .augment import Draw


class PairBatchSampler(torch.utils.data.Sampler):
    """Batches of pair indices: epoch e is a permutation seeded by (seed, e); a partial last batch
    is dropped. Iteration starts at micro-batch ``start`` and yields ``total - start`` batches of
    `Draw`s (index, epoch): the epoch feeds the per-epoch augmentation decisions (caption dropout,
    flip) and the cached reference's draw.
    """

    def __init__(self, num_pairs: int, batch_size: int, *, seed: int, total: int, start: int = 0):
        if num_pairs < batch_size:
            raise ValueError(f"{num_pairs} pairs are fewer than one batch of {batch_size}")
        self.num_pairs, self.batch_size, self.seed = num_pairs, batch_size, seed
        self.total, self.start = total, start
        self.per_epoch = num_pairs // batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_pairs, generator=generator)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The ``per_epoch`` batches of `epoch`, in order."""
        order = self.epoch_order(epoch)
        b = self.batch_size
        return [order[i * b:(i + 1) * b].tolist() for i in range(self.per_epoch)]

    def __iter__(self) -> Iterator[list[Draw]]:
        epoch, offset = divmod(self.start, self.per_epoch)
        batches = self.epoch_batches(epoch)
        for _ in range(self.start, self.total):
            batch = batches[offset]
            yield [Draw(i, epoch) for i in batch]
            offset += 1
            if offset == self.per_epoch:
                epoch, offset = epoch + 1, 0
                batches = self.epoch_batches(epoch)

    def __len__(self) -> int:
        return max(0, self.total - self.start)


class BucketBatchSampler(PairBatchSampler):
    """Like `PairBatchSampler`, but every batch holds pairs of one bucket only.

    Epoch e takes the same permutation, splits it by bucket (keeping the order), cuts each bucket's
    list into full batches (a partial batch per bucket is dropped) and orders the batches by the
    position of their first pair in the permutation. With a single bucket this is exactly
    `PairBatchSampler`'s order.
    """

    def __init__(self, buckets: Sequence[Hashable], batch_size: int, *, seed: int, total: int,
                 start: int = 0):
        super().__init__(len(buckets), batch_size, seed=seed, total=total, start=start)
        self.buckets = list(buckets)
        counts: dict[Hashable, int] = {}
        for bucket in self.buckets:
            counts[bucket] = counts.get(bucket, 0) + 1
        self.per_epoch = sum(n // batch_size for n in counts.values())
        if self.per_epoch == 0:
            raise ValueError(
                f"no bucket holds a full batch of {batch_size} pairs (pairs per bucket: "
                f"{counts}); lower train_batch_size or widen the buckets (bucket_reso_steps)")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = self.epoch_order(epoch).tolist()
        rank = {index: position for position, index in enumerate(order)}
        members: dict[Hashable, list[int]] = {}
        for index in order:
            members.setdefault(self.buckets[index], []).append(index)
        b = self.batch_size
        batches = [indices[i * b:(i + 1) * b]
                   for indices in members.values() for i in range(len(indices) // b)]
        return sorted(batches, key=lambda batch: rank[batch[0]])


def fixed_batches(indices: Sequence[int], batch_size: int,
                  buckets: Sequence[Hashable] | None = None) -> list[list[Draw]]:
    """``indices`` cut into batches of at most ``batch_size`` (the last of each bucket may be
    short, so every index is used once), one bucket per batch, order kept within a bucket; each
    pair drawn as in epoch 0."""
    members: dict[Hashable, list[int]] = {}
    for index in indices:
        members.setdefault(None if buckets is None else buckets[index], []).append(index)
    return [[Draw(index, 0) for index in group[i:i + batch_size]] for group in members.values()
            for i in range(0, len(group), batch_size)]
