"""The stores a run reads instead of computing: latents (sd-scripts' cache_latents), text-encoder
outputs (cache_text_encoder_outputs) and reference errors (reference = "cached"), and the dataset
and collate that read them. The passes that fill them run the model: training/precompute.py.

Batches from the stores carry ``latents`` ([2B, ...], winners first) instead of ``pixel_values``
and ``cond`` (the adapter's Conditioning, [B, ...]) instead of ``prompts``, plus the data
pipeline's other per-pair tensors (SDXL's size and crop ids). Nothing here assumes a latent rank:
images give [C, H, W] per sample, video [C, F, H, W] or [F, C, H, W].

A latent store holds one entry per distinct pair (the same two images: sd-scripts' num_repeats
lists a pair several times), in memory or as one safetensors file per distinct pair.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open

from .augment import Draw
from .batch import PairBatch


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


def pair_slots(records) -> list[int]:
    """Each pair's slot in a latent store: the index of the first pair with the same two images
    (and saved latents), so a repeated pair is encoded and stored once."""
    first: dict[tuple, int] = {}
    return [first.setdefault((str(r.chosen), str(r.rejected), str(r.chosen_latents or ""),
                              str(r.rejected_latents or "")), i) for i, r in enumerate(records)]


class LatentCache:
    """Per slot (see `pair_slots`): ``latents`` [2, ...] (winner, loser) and ``extra.<key>``
    tensors, in memory (``entries``) or in ``folder/<slot>.safetensors``; pair i reads its slot."""

    def __init__(self, slots: list[int], entries: dict[int, dict] | None = None,
                 folder: Path | None = None):
        self.slots, self.entries, self.folder = slots, entries, folder

    def file(self, slot: int) -> Path:
        return self.folder / f"{slot:08d}.safetensors"

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        slot = self.slots[index]
        if self.entries is not None:
            return self.entries[slot]
        with safe_open(self.file(slot), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def has_valid_file(self, slot: int, key: str) -> bool:
        try:
            with safe_open(self.file(slot), framework="pt") as f:
                return (f.metadata() or {}).get("fingerprint") == key
        except Exception:  # missing, truncated or foreign: rebuild it
            return False


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


def draw_index(pair: int, epoch: int, draws: int) -> int:
    """Which of a pair's K cached draws epoch e uses: k = (e + pair) mod K (cycles every K epochs;
    the pair offset spreads the draws of one batch)."""
    return (epoch + pair) % draws


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


@dataclass(frozen=True)
class PairStores:
    """What a run reads instead of computing; each None when the run does not cache it."""

    latents: LatentCache | None = None
    prompts: PromptCache | None = None
    reference: CachedReferenceErrors | None = None

    @property
    def in_memory(self) -> bool:
        """Latents held in this process (a loader worker would copy them all)."""
        return self.latents is not None and self.latents.folder is None


class CachedPairDataset(torch.utils.data.Dataset):
    """Items by `Draw` (pair index, epoch): cached latents (or the data pipeline's decoded item),
    the caption, and, with a cached reference, the pair's stored draw for that epoch."""

    def __init__(self, base_dataset, records, latents: LatentCache | None,
                 reference: CachedReferenceErrors | None = None):
        self.base, self.records = base_dataset, records
        self.latents, self.reference = latents, reference

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, draw: Draw) -> dict:
        index, epoch = draw
        if self.latents is None:
            item = dict(self.base[draw])
        else:
            record = self.records[index]
            # the data pipeline's per-(seed, epoch, pair) augmentation decisions, when it has them
            augmentation = getattr(self.base, "augmentation", None)
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
