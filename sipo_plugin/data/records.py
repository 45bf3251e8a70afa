"""What a preference pair is: its prompt and where its two images are (a file, or a cell of a
parquet shard). Plain values with no imports from the package: every reader builds them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union


@dataclass(frozen=True)
class ParquetImage:
    """One image cell of a parquet shard: ``file`` row ``row`` (0-based, whole file), ``column``."""

    file: Path
    row: int
    column: str

    def __str__(self) -> str:
        return f"{self.file} row {self.row} ({self.column})"


ImageSource = Union[Path, ParquetImage]


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
