"""Pick-a-Pic v2 parquet shards as preference pairs.

Columns used: ``jpg_0``, ``jpg_1`` (encoded image bytes, or a ``{"bytes": ...}`` struct),
``label_0`` (1: ``jpg_0`` preferred, 0: ``jpg_1`` preferred, 0.5: tie) and ``caption``; others are
ignored. Ties (and rows without a label) are dropped and counted in one log line.

Reading is lazy: `read_pickapic` reads only ``label_0`` and ``caption``; an image is a
`ParquetImage` (shard, row, column) whose bytes are fetched when the pair is loaded.
`ParquetImageReader` reads the two image columns of one row group at a time and keeps those
compressed bytes (never decoded images) until a row of another row group is asked for. In a
shuffled order that is about one row-group read per pair, so shards written with small row groups
(e.g. ``pyarrow.parquet.write_table(..., row_group_size=64)``) load faster.

Bucketing needs every image's size: one pass over a shard's image columns reads them from the
headers, and the result (4 ints a row) is memoised per shard version (path, mtime, size), so the
several loaders a run builds do not re-read the shards.
"""

from __future__ import annotations

import bisect
import functools
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import PairDataError
from .images import image_size_from_bytes
from .records import PairRecord, ParquetImage

IMAGE_COLUMNS = ("jpg_0", "jpg_1")
REQUIRED_COLUMNS = (*IMAGE_COLUMNS, "label_0", "caption")
INSTALL_HINT = "pip install 'sipo-plugin[pickapic]'"


def _parquet(where: Path):
    """pyarrow.parquet, or a one-line PairDataError saying how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PairDataError(
            f"{where}: reading Pick-a-Pic parquet needs pyarrow: {INSTALL_HINT}"
        ) from None
    return pq


def parquet_shards(path: str | os.PathLike) -> list[Path]:
    """A ``.parquet`` file, or every ``*.parquet`` in a folder (sorted by name)."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".parquet")
    return [path]


def _check_columns(shard: Path, names: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise PairDataError(
            f"{shard}: missing column(s) {', '.join(map(repr, missing))} (Pick-a-Pic v2 shards "
            f"have {', '.join(REQUIRED_COLUMNS)}); point train_data at Pick-a-Pic parquet files"
        )


def _pair_or_none(shard: Path, row: int, label: object, caption: object) -> PairRecord | None:
    """The PairRecord of one row, or None for a tie / a row without a label."""
    if label is None or (isinstance(label, float) and math.isnan(label)) or label == 0.5:
        return None
    if label not in (0, 1) or isinstance(label, bool):
        raise PairDataError(f"{shard} row {row}: 'label_0' must be 1, 0 or 0.5, got {label!r}")
    if caption is not None and not isinstance(caption, str):
        raise PairDataError(f"{shard} row {row}: 'caption' must be text, got {caption!r}")
    first, second = (ParquetImage(shard, row, column) for column in IMAGE_COLUMNS)
    chosen, rejected = (first, second) if label == 1 else (second, first)
    return PairRecord(caption or "", chosen, rejected)


def read_pickapic(path: str | os.PathLike, *, log: Callable[[str], None] | None = None
                  ) -> list[PairRecord]:
    """Pairs of a Pick-a-Pic v2 shard or folder of shards, in shard-then-row order."""
    shards = parquet_shards(path)
    pq = _parquet(Path(path))
    records, ties, unlabelled = [], 0, 0
    for shard in shards:
        try:
            with pq.ParquetFile(shard) as parquet_file:
                _check_columns(shard, parquet_file.schema_arrow.names)
                table = parquet_file.read(columns=["label_0", "caption"])
        except PairDataError:
            raise
        except Exception as err:  # pyarrow raises several types for a bad file
            raise PairDataError(
                f"{shard}: not a readable parquet file ({type(err).__name__}: {err})"
            ) from None
        labels, captions = table.column("label_0").to_pylist(), table.column("caption").to_pylist()
        for row, (label, caption) in enumerate(zip(labels, captions)):
            record = _pair_or_none(shard, row, label, caption)
            if record is not None:
                records.append(record)
            elif label == 0.5:
                ties += 1
            else:
                unlabelled += 1
    summary = f"pickapic: {len(records):,} pairs from {len(shards)} shard(s); {ties:,} ties dropped"
    if unlabelled:
        summary += f"; {unlabelled:,} rows without label_0 dropped"
    if log is not None:
        log(summary)
    return records


class ParquetImageReader:
    """Bytes of `ParquetImage` cells, reading one row group (both image columns) at a time."""

    def __init__(self) -> None:
        self._group_starts: dict[Path, list[int]] = {}
        self._cached_group: tuple[Path, int] | None = None
        self._cached_columns: dict[str, list] = {}

    def __getstate__(self) -> dict:
        # DataLoader workers start with an empty cache rather than a pickled row group
        return {"_group_starts": self._group_starts, "_cached_group": None, "_cached_columns": {}}

    def group_starts(self, file: Path) -> list[int]:
        """First row of each row group of `file`, then its row count."""
        if file not in self._group_starts:
            with _parquet(file).ParquetFile(file) as parquet_file:
                metadata = parquet_file.metadata
            counts = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
            self._group_starts[file] = [sum(counts[:i]) for i in range(len(counts) + 1)]
        return self._group_starts[file]

    def read(self, image: ParquetImage) -> bytes:
        starts = self.group_starts(image.file)
        group = bisect.bisect_right(starts, image.row) - 1
        if self._cached_group != (image.file, group):
            self._cached_columns = {}  # release the previous row group first
            with _parquet(image.file).ParquetFile(image.file) as parquet_file:
                table = parquet_file.read_row_group(group, columns=list(IMAGE_COLUMNS))
            self._cached_columns = {c: table.column(c) for c in IMAGE_COLUMNS}
            self._cached_group = (image.file, group)
        value = self._cached_columns[image.column][image.row - starts[group]].as_py()
        if isinstance(value, dict):  # a datasets Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes")
        if not value:
            raise PairDataError(f"{image}: no image bytes in the cell; drop the row from the shard")
        return value

    def size(self, image: ParquetImage) -> tuple[int, int]:
        """(width, height) of the cell's image, from the memoised per-shard header pass."""
        stat = image.file.stat()
        sizes = _shard_image_sizes(image.file, stat.st_mtime_ns, stat.st_size)
        w, h = sizes[image.row, IMAGE_COLUMNS.index(image.column)].tolist()
        if w < 0:  # unreadable: decode again for the one-line error naming the cell
            return image_size_from_bytes(self.read(image), str(image))
        return w, h


@functools.lru_cache(maxsize=None)
def _shard_image_sizes(file: Path, mtime_ns: int, file_size: int) -> np.ndarray:
    """int32 [rows, 2 (jpg_0, jpg_1), 2 (w, h)] image sizes of a shard from the headers; -1 where
    the bytes are unreadable (reported only if that image is used: a tie's broken image is not)."""
    del mtime_ns, file_size  # memo key only: a rewritten shard is read again
    reader = ParquetImageReader()
    sizes = np.full((reader.group_starts(file)[-1], len(IMAGE_COLUMNS), 2), -1, dtype=np.int32)
    for row in range(len(sizes)):
        for j, column in enumerate(IMAGE_COLUMNS):
            cell = ParquetImage(file, row, column)
            try:
                sizes[row, j] = image_size_from_bytes(reader.read(cell), str(cell))
            except PairDataError:
                pass  # stays -1
    return sizes
