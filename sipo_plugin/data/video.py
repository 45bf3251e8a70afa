"""Video preference pairs: clips from video files or frame folders, for the video families.

The pair sources are the image ones (`read_pairs`: JSONL / CSV manifests with ``prompt``,
``chosen``, ``rejected``, optional ``weight``), where ``chosen`` / ``rejected`` name

  * a video file (``VIDEO_EXTENSIONS``: .mp4 .webm .mov .mkv .gif), decoded with PyAV
    (``pip install 'sipo-plugin[video]'``), or
  * a frame folder: a directory of images (``IMAGE_EXTENSIONS``), frames in file-name order.

A clip is ``num_frames`` frames (4k+1: the video VAEs compress time 4x after the first frame)
starting at the first frame:

  * video file, ``frame_fps > 0``: resampled by presentation timestamps; output frame j is the
    frame on screen at ``t_j = t_0 + j / frame_fps`` (the last frame with timestamp <= t_j), so
    both down- and up-sampling keep real-time speed; the clip must last until ``t_{F-1}``;
  * video file, ``frame_fps = 0``, and frame folders: the first ``num_frames`` frames as they are
    (a frame folder has no timestamps; extract it at the rate you train at).

Each frame is resized to cover ``video_height`` x ``video_width`` and centre-cropped (the image
path's `resize_center_crop`). `VideoPairDataset` items mirror `PairDataset`'s (prompt, chosen,
rejected, weight) with chosen / rejected float32 ``[3, F, H, W]`` in [-1, 1], so `collate_pairs`
gives ``pixel_values [2B, 3, F, H, W]``, winners first.

`save_clip` writes frames as an animated GIF (sample clips of the video families).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from ..models.families import check_num_frames
from ..utils.io import atomic_write_bytes
from .augment import Draw
from .errors import PairDataError
from .images import IMAGE_EXTENSIONS, open_rgb, pil_to_tensor, resize_center_crop
from .pairs import PairRecord

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".gif")
INSTALL_HINT = "pip install 'sipo-plugin[video]'"
_TIME_EPS = 1e-6  # seconds; timestamps are rationals turned into floats

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Frame selection (pure) and decoding


def frame_targets(t0: float, num_frames: int, fps: float) -> list[float]:
    """Presentation times of the clip's frames: ``t_j = t0 + j / fps``, j = 0 .. F-1."""
    return [t0 + j / fps for j in range(num_frames)]


def select_frames(frames: Iterable[tuple[float, T]], num_frames: int, fps: float
                  ) -> tuple[list[T], float]:
    """Pick ``num_frames`` items from a stream of (timestamp seconds, item) in display order.

    ``fps > 0``: item j is the last one with timestamp <= ``t_j = t_0 + j / fps`` (the frame on
    screen then); ``fps == 0``: the first ``num_frames`` items. Reads the stream only as far as
    needed. Returns (picked items, seconds from the first to the last timestamp read); fewer than
    ``num_frames`` items means the stream ended first.
    """
    picked: list[T] = []
    targets: list[float] = []
    prev: tuple[float, T] | None = None
    first_time = last_time = None
    for time, item in frames:
        first_time = time if first_time is None else first_time
        last_time = time
        if fps <= 0:
            picked.append(item)
            if len(picked) == num_frames:
                break
            continue
        if prev is None:
            targets = frame_targets(time, num_frames, fps)
        else:
            while len(picked) < num_frames and targets[len(picked)] < time - _TIME_EPS:
                picked.append(prev[1])
        if len(picked) == num_frames:
            break
        prev = (time, item)
    if fps > 0 and prev is not None:  # the last frame read stays on screen from its timestamp on
        while len(picked) < num_frames and targets[len(picked)] <= prev[0] + _TIME_EPS:
            picked.append(prev[1])
    return picked, 0.0 if first_time is None else last_time - first_time


def _import_av():
    try:
        import av
    except ImportError:
        raise ImportError(f"reading video files needs PyAV: {INSTALL_HINT}") from None
    return av


def _decoded_frames(container, stream) -> Iterable[tuple[float, Any]]:
    """(seconds, av.VideoFrame) in display order; frames without a timestamp get index / rate."""
    rate = float(stream.average_rate or stream.guessed_rate or 0) or None
    for index, frame in enumerate(container.decode(stream)):
        time = frame.time
        if time is None:
            if rate is None:
                raise ValueError("frames carry no timestamps and the stream no frame rate")
            time = index / rate
        yield float(time), frame


def read_video_frames(path: str | os.PathLike, num_frames: int, fps: float) -> list[Image.Image]:
    """``num_frames`` RGB frames of a video file sampled at ``fps`` (0: the file's own frames)."""
    av = _import_av()
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise PairDataError(f"{path}: no video stream; give a video file or frame folder")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            picked, span = select_frames(_decoded_frames(container, stream), num_frames, fps)
            images = [frame.to_image().convert("RGB") for frame in picked]
    except PairDataError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as err:
        raise PairDataError(f"{path}: cannot decode video ({type(err).__name__}: {err}); "
                            f"re-encode it (e.g. H.264 mp4) or remove the pair") from err
    if len(images) < num_frames:
        need = f"{(num_frames - 1) / fps:.3g} s at frame_fps = {fps:g}" if fps > 0 else \
            f"{num_frames} frames"
        have = f"{span:.3g} s" if fps > 0 else f"{len(images)} frames"
        raise PairDataError(f"{path}: clip too short: num_frames = {num_frames} needs {need}, the "
                            f"clip has {have}; use a longer clip, or lower num_frames or frame_fps")
    return images


def read_frame_folder(path: str | os.PathLike, num_frames: int) -> list[Image.Image]:
    """The first ``num_frames`` images of a folder, in file-name order."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) < num_frames:
        raise PairDataError(f"{path}: frame folder has {len(files)} frames, num_frames = "
                            f"{num_frames} needs more; add frames or lower num_frames")
    return [open_rgb(p) for p in files[:num_frames]]


def load_video(path: str | os.PathLike, *, num_frames: int, frame_fps: float, height: int,
               width: int) -> torch.Tensor:
    """A video file or frame folder -> float32 ``[3, F, H, W]`` in [-1, 1] (see module doc)."""
    path = Path(path)
    if path.is_dir():
        images = read_frame_folder(path, num_frames)
    elif path.suffix.lower() in VIDEO_EXTENSIONS:
        images = read_video_frames(path, num_frames, frame_fps)
    else:
        raise PairDataError(f"{path}: not a video ({', '.join(VIDEO_EXTENSIONS)}) or a frame "
                            "folder; video families train on clips")
    frames = [pil_to_tensor(resize_center_crop(img, (height, width))) for img in images]
    return torch.stack(frames, dim=1)  # [3, F, H, W]


# ---------------------------------------------------------------------------------------------
# Dataset


class VideoPairDataset(torch.utils.data.Dataset):
    """Decodes a pair on access: dict(prompt, chosen [3,F,H,W], rejected [3,F,H,W], weight), by
    `Draw` (index, epoch) like `PairDataset` (clips have no per-epoch augmentation)."""

    def __init__(self, records: Sequence[PairRecord], *, num_frames: int, frame_fps: float,
                 height: int, width: int):
        check_num_frames(num_frames)
        if frame_fps < 0:
            raise ValueError(f"frame_fps must be >= 0 (0: the source's own frames), got {frame_fps}")
        self.records = list(records)
        self.target_hw = None  # one clip size for every pair: no buckets
        self.clip = {"num_frames": num_frames, "frame_fps": frame_fps, "height": height,
                     "width": width}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, draw: Draw) -> dict:
        index, _ = draw
        record = self.records[index]
        return {
            "prompt": record.prompt,
            "chosen": load_video(record.chosen, **self.clip),
            "rejected": load_video(record.rejected, **self.clip),
            "weight": record.weight,
            "index": index,  # the pair's identity (collate_pairs; per-pair noise seeds)
        }


def video_dataset(config, records: Sequence[PairRecord]) -> VideoPairDataset:
    """The run's `VideoPairDataset` from its [data] settings (checked for the model family at
    start-up: `sipo_plugin.training.checks.family`)."""
    d = config.data
    return VideoPairDataset(records, num_frames=d.num_frames, frame_fps=d.frame_fps,
                            height=d.video_height, width=d.video_width)


# ---------------------------------------------------------------------------------------------
# Writing sample clips


def clip_images(frames) -> list[Image.Image]:
    """Frames as RGB PIL images, from any of: a list of PIL images; an array / tensor
    ``[F, H, W, 3]`` (uint8, or float in [0, 1] as pipelines' ``output_type="np"`` returns); a
    tensor ``[3, F, H, W]`` in [-1, 1] (this module's layout)."""
    if isinstance(frames, (list, tuple)) and frames and isinstance(frames[0], Image.Image):
        return [img.convert("RGB") for img in frames]
    if isinstance(frames, torch.Tensor):
        x = frames.detach().float().cpu()
        if x.ndim == 4 and x.shape[0] == 3 and x.shape[-1] != 3:  # [3, F, H, W] in [-1, 1]
            x = ((x + 1) / 2).permute(1, 2, 3, 0)
        frames = x.numpy()
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3] or [3, F, H, W], got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return [Image.fromarray(frame) for frame in array]


def save_clip(frames, path: str | os.PathLike, fps: float = 8.0) -> Path:
    """Write ``frames`` (see `clip_images`) as a looping animated GIF at ``fps``, atomically."""
    images = clip_images(frames)
    if not images:
        raise ValueError("save_clip: no frames")
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(1, round(1000 / fps)))
    return atomic_write_bytes(path, buffer.getvalue())

