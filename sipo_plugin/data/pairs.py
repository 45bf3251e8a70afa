"""The pair dataset and the batch contract: batches are ``[winners; losers]`` on dim 0
(Diffusion-DPO layout): use `split_pair`. SDXL's size conditioning comes along in the same layout
(`collate_pairs`). The readers are in `readers.py` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .augment import Draw, PairAugmentation
from .batch import PairBatch
from ..objectives.errors import split_pair  # noqa: F401  (the one helper for the layout)
from .images import fit_to_size, pil_to_tensor
from .readers import (PairRecord, read_csv_manifest, read_jsonl_manifest,  # noqa: F401
                      read_pair_folder, read_pairs)
from .saved_latents import read_latents
from .sources import ImageReader


# ---------------------------------------------------------------------------------------------
# Dataset and batch contract


class PairDataset(torch.utils.data.Dataset):
    """Decodes a pair on access: dict(prompt, chosen [3,H,W], rejected [3,H,W], weight, index,
    original_size, crop_top_left, target_size).

    The key is a `Draw` (index, epoch), as the samplers give it; the epoch feeds the augmentation
    decisions. ``target_hw`` gives each pair its own (h, w) training size (its bucket); without it
    every pair is ``resolution``. Size entries are (winner, loser) tuples of (h, w) / (top, left), see `fit_to_size`.
    """

    def __init__(self, records: Sequence[PairRecord], resolution: int | tuple[int, int], *,
                 target_hw: Sequence[tuple[int, int]] | None = None,
                 augmentation: PairAugmentation | None = None):
        self.records = list(records)
        self.resolution = resolution
        if target_hw is not None and len(target_hw) != len(self.records):
            raise ValueError(f"target_hw has {len(target_hw)} sizes for {len(self.records)} pairs")
        self.target_hw = None if target_hw is None else list(target_hw)
        self.augmentation = augmentation or PairAugmentation()
        self.reader = ImageReader()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, draw: Draw) -> dict:
        index, epoch = draw
        record = self.records[index]
        drop_caption, flip = self.augmentation.decide(epoch, index)
        size = self.resolution if self.target_hw is None else self.target_hw[index]
        chosen = fit_to_size(self.reader.open(record.chosen), size, flip=flip)
        rejected = fit_to_size(self.reader.open(record.rejected), size, flip=flip)
        saved = {} if record.chosen_latents is None else {"latents": torch.stack(
            [read_latents(record.chosen_latents), read_latents(record.rejected_latents)])}
        return {**saved,
            "prompt": "" if drop_caption else record.prompt,
            "chosen": pil_to_tensor(chosen.image),
            "rejected": pil_to_tensor(rejected.image),
            "weight": record.weight,
            "index": index,  # the pair's identity: per-pair noise is seeded from it
            "original_size": (chosen.original_hw, rejected.original_hw),
            "crop_top_left": (chosen.crop_top_left, rejected.crop_top_left),
            "target_size": chosen.target_hw,
        }


def _winners_first(items: Sequence[Mapping], key: str) -> torch.Tensor:
    """[2B, 2] int64 from items whose `key` holds a (winner, loser) pair of 2-tuples."""
    rows = [item[key][0] for item in items] + [item[key][1] for item in items]
    return torch.tensor(rows, dtype=torch.int64)


def collate_pairs(items: Sequence[Mapping]) -> PairBatch:
    """B items -> a `PairBatch`: pixel_values [2B,3,H,W] (winners first, then losers), prompts
    [B], weights [B], indices [B], saved latents [2B, ...] when the items carry them, and SDXL's
    per-image conditioning in the pixel layout as extras: original_sizes [2B,2] (h, w before
    resizing), crop_top_lefts [2B,2] (top, left), target_sizes [2B,2] (h, w)."""
    if not items:
        raise ValueError("collate_pairs: empty batch")
    chosen = torch.stack([item["chosen"] for item in items])  # [B, 3, H, W]
    rejected = torch.stack([item["rejected"] for item in items])  # [B, 3, H, W]
    latents = None
    if "latents" in items[0]:  # saved latents [2, ...] per pair -> [2B, ...], winners first
        latents = torch.cat([torch.stack([item["latents"][side] for item in items])
                             for side in (0, 1)])
    extras = {}
    if "original_size" in items[0]:
        extras["original_sizes"] = _winners_first(items, "original_size")
        extras["crop_top_lefts"] = _winners_first(items, "crop_top_left")
        target = [tuple(item["target_size"]) for item in items]
        extras["target_sizes"] = torch.tensor(target + target, dtype=torch.int64)
    return PairBatch(
        pixel_values=torch.cat([chosen, rejected], dim=0),  # [2B, 3, H, W]
        latents=latents,
        prompts=[item["prompt"] for item in items],
        weights=torch.tensor([float(item["weight"]) for item in items], dtype=torch.float32),
        indices=torch.tensor([int(item["index"]) for item in items], dtype=torch.int64),
        extras=extras)
