"""Where a pair's image comes from: a file path, or a cell of a parquet shard (Pick-a-Pic)."""

from __future__ import annotations

from PIL import Image

from .images import decode_rgb, image_size, open_rgb
from .pickapic import ParquetImageReader
from .records import ImageSource, ParquetImage


class ImageReader:
    """Opens any `ImageSource`; parquet cells go through one `ParquetImageReader` (its cache)."""

    def __init__(self) -> None:
        self.parquet = ParquetImageReader()

    def open(self, source: ImageSource) -> Image.Image:
        """Decoded RGB image (EXIF rotation applied); PairDataError naming the source if corrupt."""
        if isinstance(source, ParquetImage):
            return decode_rgb(self.parquet.read(source), str(source))
        return open_rgb(source)

    def size(self, source: ImageSource) -> tuple[int, int]:
        """(width, height) from the image header, as `open` would return it."""
        if isinstance(source, ParquetImage):
            return self.parquet.size(source)
        return image_size(source)
