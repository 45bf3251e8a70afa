"""Preference-pair readers and the batch contract.

Sources (`read_pairs` dispatches on the path):
  * a ``.parquet`` file or a folder of ``*.parquet`` shards in the Pick-a-Pic v2 layout (see
    `sipo_plugin.data.pickapic`): images stay in the shards and are decoded on access;
  * a folder with ``w/`` and ``l/`` subfolders (sd-scripts PR #1427): ``w/NAME.ext`` is preferred
    over ``l/NAME.ext`` (extensions may differ), caption ``w/NAME<caption_extension>`` (first line);
    pairs sorted by NAME;
  * an sd-scripts dataset config (``.toml``: ``[[datasets.subsets]]`` whose ``image_dir`` is a
    folder as above, with ``num_repeats`` and ``caption_extension``; `sipo_plugin.sdscripts`):
    each subset's pairs, listed ``num_repeats`` times;
  * a ``.jsonl`` manifest (one JSON object a line) or a ``.csv`` manifest (header row), with
    ``prompt``, ``chosen``, ``rejected`` (paths relative to the manifest's folder, or absolute) and
    an optional ``weight`` (default 1); extra fields are ignored; pairs keep the manifest's order.

Every image path is checked at read time; images are decoded (and corrupt ones reported) at load
time. Batches are ``[winners; losers]`` on dim 0 (Diffusion-DPO layout): use `split_pair`.
SDXL's size conditioning comes along in the same layout (`collate_pairs`).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .augment import PairAugmentation
from .errors import PairDataError
from ..objectives.errors import split_pair  # noqa: F401  (the one helper for the layout)
from .images import IMAGE_EXTENSIONS, fit_to_size, pil_to_tensor
from .pickapic import read_pickapic
from .saved_latents import read_latents
from .sources import ImageReader, ImageSource

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")
_SOURCES = ("expected a folder with w/ and l/ subfolders, a .jsonl or .csv manifest, "
            "Pick-a-Pic .parquet shard(s), or an sd-scripts dataset config (.toml)")


@dataclass(frozen=True)
class PairRecord:
    """One preference pair: `chosen` is preferred over `rejected` for `prompt`.

    An image is a file path or a `ParquetImage` cell (shard, row, column).
    """

    prompt: str
    chosen: ImageSource
    rejected: ImageSource
    weight: float = 1.0
    # the sampler's final latents of each image (a `sipo-pairs make` manifest); used instead of
    # a VAE encode when they fit the run (sipo_plugin.data.saved_latents)
    chosen_latents: Path | None = None
    rejected_latents: Path | None = None


def _has_parquet(folder: Path) -> bool:
    return any(p.suffix.lower() == ".parquet" for p in folder.iterdir())


def read_pairs(source: str | os.PathLike, *, caption_extension: str = ".txt",
               log: Callable[[str], None] | None = tqdm.write) -> list[PairRecord]:
    """Read and validate all pairs of `source` (see the module docstring for the layouts).

    `log` receives the one summary line of sources that drop rows (Pick-a-Pic ties).
    """
    path = Path(source)
    if not path.exists():
        raise PairDataError(f"{path}: pair source not found ({_SOURCES})")
    if path.is_dir():
        if (path / "w").is_dir() and (path / "l").is_dir():
            records = read_pair_folder(path, caption_extension=caption_extension)
        elif _has_parquet(path):
            records = read_pickapic(path, log=log)
        else:
            raise PairDataError(f"{path}: folder has no w/ and l/ subfolders ({_SOURCES})")
    elif path.suffix.lower() == ".parquet":
        records = read_pickapic(path, log=log)
    elif path.suffix.lower() == ".toml":
        records = read_dataset_config_pairs(path, caption_extension=caption_extension)
    elif path.suffix.lower() == ".jsonl":
        records = read_jsonl_manifest(path)
    elif path.suffix.lower() == ".csv":
        records = read_csv_manifest(path)
    else:
        raise PairDataError(f"{path}: unknown pair source type '{path.suffix}' ({_SOURCES})")
    if not records:
        raise PairDataError(f"{path}: no pairs found (empty dataset); add pairs or fix the path")
    return records


# ---------------------------------------------------------------------------------------------
# Folder layout


def _images_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not (p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
            continue
        if p.stem in found:
            raise PairDataError(
                f"{p}: two images named '{p.stem}' in {folder} ({found[p.stem].name}, {p.name}); "
                f"keep one per name"
            )
        found[p.stem] = p
    return found


def _unpaired_error(name: str, winners: dict[str, Path], losers: dict[str, Path]) -> PairDataError:
    if name in winners:
        return PairDataError(
            f"{winners[name]}: unpaired winner, no l/{name}.<ext> beside it; "
            f"add the loser image or remove the winner"
        )
    return PairDataError(
        f"{losers[name]}: unpaired loser, no w/{name}.<ext> beside it; "
        f"add the winner image or remove the loser"
    )


def _read_caption(path: Path, name: str) -> str:
    if not path.is_file():
        raise PairDataError(
            f"{path}: caption file missing for pair '{name}' (captions sit beside the winner "
            f"in w/; write it or set caption_extension)"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise PairDataError(
            f"{path}: caption is not UTF-8 text ({err.reason}); re-save it as UTF-8"
        ) from None
    return lines[0].strip() if lines else ""


def read_pair_folder(
    root: str | os.PathLike, *, caption_extension: str = ".txt"
) -> list[PairRecord]:
    """``root/w/NAME.ext`` (winner, caption beside it) vs ``root/l/NAME.ext``; sorted by NAME."""
    root = Path(os.path.abspath(root))
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    winners, losers = _images_by_stem(root / "w"), _images_by_stem(root / "l")
    unpaired = sorted(winners.keys() ^ losers.keys())
    if unpaired:
        raise _unpaired_error(unpaired[0], winners, losers)
    records = []
    for name in sorted(winners):
        caption = _read_caption(winners[name].with_name(name + caption_extension), name)
        records.append(PairRecord(caption, winners[name], losers[name]))
    return records


def read_dataset_config_pairs(path: str | os.PathLike, *, caption_extension: str = ".txt"
                              ) -> list[PairRecord]:
    """An sd-scripts dataset config: every subset's pair folder (its own caption_extension, else
    `caption_extension`), its pairs listed ``num_repeats`` times, subsets in file order."""
    from ..sdscripts.config_file import SdScriptsError
    from ..sdscripts.dataset_config import read_dataset_config
    try:
        dataset = read_dataset_config(path)
    except SdScriptsError as err:
        raise PairDataError(str(err)) from None
    records = []
    for subset in dataset.subsets:
        pairs = read_pair_folder(subset.image_dir,
                                 caption_extension=subset.caption_extension or caption_extension)
        records.extend(pairs * subset.num_repeats)
    return records


# ---------------------------------------------------------------------------------------------
# Manifests


def _parse_weight(raw: object, where: str) -> float:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return 1.0
    try:
        if isinstance(raw, bool):
            raise ValueError
        weight = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        raise PairDataError(f"{where}: 'weight' must be a positive finite number, got {raw!r}")
    return weight


def _image_path(value: object, key: str, manifest: Path, where: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise PairDataError(f"{where}: '{key}' must be a non-empty path string, got {value!r}")
    path = Path(os.path.abspath(manifest.parent / value.strip()))
    if not (path.is_file() or path.is_dir()):  # a directory: a video's frame folder
        raise PairDataError(
            f"{where}: '{key}' image not found: {path} (paths are relative to the manifest)"
        )
    return path


def _record_from_row(row: Mapping[str, object], manifest: Path, line: int) -> PairRecord:
    where = f"{manifest} line {line}"
    for key in REQUIRED_FIELDS:
        if row.get(key) is None:
            raise PairDataError(
                f"{where}: missing required field '{key}' (each pair needs "
                f"{', '.join(REQUIRED_FIELDS)}; 'weight' is optional)"
            )
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        raise PairDataError(f"{where}: 'prompt' must be a string, got {prompt!r}")
    chosen = _image_path(row["chosen"], "chosen", manifest, where)
    rejected = _image_path(row["rejected"], "rejected", manifest, where)
    latents = [Path(os.path.abspath(manifest.parent / str(row.get(key) or "")))
               for key in ("chosen_latents", "rejected_latents")]
    if not (row.get("chosen_latents") and row.get("rejected_latents")
            and all(p.is_file() for p in latents)):
        latents = [None, None]  # optional: without them (or with one missing) the images encode
    return PairRecord(prompt, chosen, rejected, _parse_weight(row.get("weight"), where), *latents)


def read_jsonl_manifest(path: str | os.PathLike) -> list[PairRecord]:
    """One JSON object a line; blank lines are skipped; manifest order is kept."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise PairDataError(
                    f"{path} line {line_no}: malformed JSON ({err.msg}, column {err.colno}); "
                    f"write one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise PairDataError(
                    f"{path} line {line_no}: expected a JSON object with "
                    f"{', '.join(REQUIRED_FIELDS)}, got {type(row).__name__}"
                )
            records.append(_record_from_row(row, path, line_no))
    return records


def read_csv_manifest(path: str | os.PathLike) -> list[PairRecord]:
    """A header row naming the columns, one pair a row; manifest order is kept."""
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = [name.strip() for name in (reader.fieldnames or [])]
        if not header:
            return []
        missing = [key for key in REQUIRED_FIELDS if key not in header]
        if missing:
            raise PairDataError(
                f"{path} line 1: missing required column(s) {', '.join(map(repr, missing))} "
                f"(header has: {', '.join(header)});"
                f" the header needs prompt,chosen,rejected[,weight]"
            )
        reader.fieldnames = header
        return [_record_from_row(row, path, reader.line_num) for row in reader]


# ---------------------------------------------------------------------------------------------
# Dataset and batch contract


class PairDataset(torch.utils.data.Dataset):
    """Decodes a pair on access: dict(prompt, chosen [3,H,W], rejected [3,H,W], weight, index,
    original_size, crop_top_left, target_size).

    The key is a pair index, or a `Draw` (index, epoch) from a sampler built ``with_epoch``; the
    epoch feeds the augmentation decisions (a bare index counts as epoch 0). ``target_hw`` gives
    each pair its own (h, w) training size (its bucket); without it every pair is ``resolution``.
    Size entries are (winner, loser) tuples of (h, w) / (top, left), see `fit_to_size`.
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

    def __getitem__(self, key) -> dict:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)
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


def collate_pairs(items: Sequence[Mapping]) -> dict:
    """B items -> pixel_values [2B,3,H,W] (winners first, then losers), prompts [B], weights [B],
    indices [B], and SDXL's per-image conditioning in the pixel layout: original_sizes [2B,2]
    (h, w before resizing), crop_top_lefts [2B,2] (top, left), target_sizes [2B,2] (h, w)."""
    if not items:
        raise ValueError("collate_pairs: empty batch")
    chosen = torch.stack([item["chosen"] for item in items])  # [B, 3, H, W]
    rejected = torch.stack([item["rejected"] for item in items])  # [B, 3, H, W]
    batch = {
        "pixel_values": torch.cat([chosen, rejected], dim=0),  # [2B, 3, H, W]
        "prompts": [item["prompt"] for item in items],
        "weights": torch.tensor([float(item["weight"]) for item in items], dtype=torch.float32),
        "indices": torch.tensor([int(item["index"]) for item in items], dtype=torch.int64),
    }
    if "latents" in items[0]:  # saved latents [2, ...] per pair -> [2B, ...], winners first
        batch["latents"] = torch.cat([torch.stack([item["latents"][side] for item in items])
                                      for side in (0, 1)])
    if "original_size" in items[0]:
        batch["original_sizes"] = _winners_first(items, "original_size")
        batch["crop_top_lefts"] = _winners_first(items, "crop_top_left")
        target = [tuple(item["target_size"]) for item in items]
        batch["target_sizes"] = torch.tensor(target + target, dtype=torch.int64)
    return batch
