"""Image loading with Pillow only (no torchvision): RGB, resize to cover, center crop, flip."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable, NamedTuple, TypeVar

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch loads on first use: the data checks decode images without it
    import torch

from .errors import PairDataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_T = TypeVar("_T")


def _size_hw(resolution: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    h, w = (int(r) for r in resolution)
    if h <= 0 or w <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    return h, w


def _decode_error(where: str, err: Exception) -> PairDataError:
    return PairDataError(
        f"{where}: cannot decode image ({type(err).__name__}: {err}); "
        f"re-export it or remove the pair"
    )


def _bomb_error(where: str, err: Exception) -> PairDataError:
    return PairDataError(
        f"{where}: image too large to decode safely ({err}); resize it below "
        f"{Image.MAX_IMAGE_PIXELS:,} pixels or remove the pair")


def _read_image(source: str | Path | bytes, where: str, read: Callable[[Image.Image], _T]) -> _T:
    """``read`` of the image in ``source`` (a file, or encoded bytes); PairDataError naming
    ``where`` if the file is missing or does not decode."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return read(img)
    except FileNotFoundError as err:
        raise PairDataError(f"{where}: image not found") from err
    except Image.DecompressionBombError as err:
        raise _bomb_error(where, err) from None
    except _DECODE_ERRORS as err:
        raise _decode_error(where, err) from err


_HIGH_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale PNGs decode as these


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded image -> 8-bit RGB. 16-bit grayscale (values 0..65535) maps to 8 bits as
    v8 = v16 >> 8 (Pillow's own convert("RGB") clips it to 255: a pure white image)."""
    if img.mode in _HIGH_BIT_GRAY:
        v16 = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray((v16 >> 8).astype(np.uint8), mode="L")
    return img.convert("RGB")


def _load_rgb(img: Image.Image) -> Image.Image:
    img.load()
    return to_rgb(ImageOps.exif_transpose(img))


def open_rgb(path: str | Path) -> Image.Image:
    """Decode `path` fully as RGB (EXIF rotation applied); PairDataError naming the file if not."""
    return _read_image(path, str(Path(path)), _load_rgb)


def decode_rgb(data: bytes, where: str) -> Image.Image:
    """Encoded image bytes -> RGB (EXIF rotation applied); PairDataError naming `where` if not."""
    return _read_image(data, where, _load_rgb)


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as `open_rgb` will return it, from the header (EXIF rotation included)."""
    w, h = img.size
    if img.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS:
        return h, w
    return w, h


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header only."""
    return _read_image(path, str(Path(path)), _oriented_size)


def image_size_from_bytes(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) of encoded image bytes, read from the header only."""
    return _read_image(data, where, _oriented_size)


class Fitted(NamedTuple):
    """An image fitted to a training size, with SDXL's size conditioning ((h, w), (top, left))."""

    image: Image.Image
    original_hw: tuple[int, int]  # before resizing
    crop_top_left: tuple[int, int]  # of the crop window in the resized (flipped: mirrored) image
    target_hw: tuple[int, int]


def fit_to_size(img: Image.Image, resolution: int | tuple[int, int], *,
                flip: bool = False) -> Fitted:
    """Scale so the image covers (H, W), center crop, then mirror left-right when `flip`.

    The crop window of the resized image (size h' x w') is (top, left) = ((h'-H)//2, (w'-W)//2).
    A flip mirrors the resized image, so its crop left counts from the other edge:
    left = w' - W - left (sd-scripts reports ``target_w - crop_right`` for a flip; diffusers' SDXL
    scripts flip before cropping: the same measurement).
    """
    h, w = _size_hw(resolution)
    original_hw = (img.height, img.width)
    scale = max(w / img.width, h / img.height)
    new_w = max(w, math.ceil(img.width * scale - 1e-6))
    new_h = max(h, math.ceil(img.height * scale - 1e-6))
    if (new_w, new_h) != img.size:
        # Lanczos for down-scaling (anti-aliased), bicubic for up-scaling.
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        img = img.resize((new_w, new_h), resample=resample)
    left, top = (new_w - w) // 2, (new_h - h) // 2
    img = img.crop((left, top, left + w, top + h))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - w - left
    return Fitted(img, original_hw, (top, left), (h, w))


def resize_center_crop(img: Image.Image, resolution: int | tuple[int, int]) -> Image.Image:
    """Scale so the image covers (H, W) (shorter side to R for squares), then center crop."""
    return fit_to_size(img, resolution).image


def pil_to_tensor(img: Image.Image) -> "torch.Tensor":
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    import torch  # here, not at the top: --check decodes images without loading torch
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # [H, W, 3] uint8
    return x.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_image(path: str | Path, resolution: int | tuple[int, int]) -> "torch.Tensor":
    """Image file -> float32 [3, R, R] (or [3, H, W] for a (H, W) resolution) in [-1, 1]."""
    return pil_to_tensor(resize_center_crop(open_rgb(path), resolution))
