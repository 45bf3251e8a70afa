"""Preference-pair readers (no torch: ``--check`` reads the data with them).

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

Every image path is checked at read time; a pair whose chosen and rejected are the same file is
refused. Images are decoded at load time, and all of them once before training (`check_images`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from .errors import PairDataError
from .images import IMAGE_EXTENSIONS
from .pickapic import read_pickapic
from .records import ImageSource, PairRecord
from ..sdscripts.config_file import SdScriptsError
from ..sdscripts.dataset_config import read_dataset_config


REQUIRED_FIELDS = ("prompt", "chosen", "rejected")
_SOURCES = ("expected a folder with w/ and l/ subfolders, a .jsonl or .csv manifest, "
            "Pick-a-Pic .parquet shard(s), or an sd-scripts dataset config (.toml)")


def _has_parquet(folder: Path) -> bool:
    return any(p.suffix.lower() == ".parquet" for p in folder.iterdir())


def read_pairs(source: str | os.PathLike, *, caption_extension: str = ".txt",
               log: Callable[[str], None] | None = print) -> list[PairRecord]:
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
    refuse_same_file_pairs(records, path)
    return records


def _same_file(a: ImageSource, b: ImageSource) -> bool:
    if not (isinstance(a, Path) and isinstance(b, Path)):
        return a == b  # parquet cells: the same shard, row and column
    return a == b or (a.exists() and b.exists() and os.path.samefile(a, b))


def refuse_same_file_pairs(records: list[PairRecord], source: Path) -> None:
    """A pair whose chosen and rejected are one file teaches nothing (d_w = d_l): PairDataError
    counting them and naming the first."""
    same = [i for i, r in enumerate(records) if _same_file(r.chosen, r.rejected)]
    if same:
        first = records[same[0]]
        raise PairDataError(
            f"{source}: {len(same)} of {len(records)} pairs use the same file as chosen and "
            f"rejected (first: pair {same[0] + 1}, {first.chosen}); remove them or fix the paths")


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


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file (a leading BOM dropped); PairDataError naming the first line that
    is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise PairDataError(f"{path} line {line}: not UTF-8 text ({err.reason} at byte "
                            f"{err.start}); re-save the file as UTF-8") from None


def read_jsonl_manifest(path: str | os.PathLike) -> list[PairRecord]:
    """One JSON object a line; blank lines are skipped; manifest order is kept."""
    path = Path(path)
    records = []
    for line_no, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.rstrip("\r"))
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
    with io.StringIO(read_utf8(path), newline="") as f:
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


