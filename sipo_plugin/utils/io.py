"""Atomic file writes: a temp file in the target's folder, fsync, then ``os.replace``.

A reader never sees a half-written file, and when writing fails (disk full, permission, an
exception while serializing) the temp file is removed and the previous file, if any, is untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch

_CHUNK = 1 << 20  # 1 MiB


class AtomicWriteError(OSError):
    """Writing a file failed; the message is one line naming the path."""


def _write_chunks(f: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        f.write(view[start:start + _CHUNK])


def _new_file_mode(path: Path) -> int:
    """Keep an existing file's permissions; new files get rw-r--r-- (mkstemp would give 0600)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o644


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (best effort: not every OS/filesystem allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise AtomicWriteError(f"could not write {path}: {err.strerror or err}") from err
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            reason = err.strerror or str(err) or type(err).__name__
            raise AtomicWriteError(
                f"could not write {path}: {reason} (nothing was replaced; free space or "
                f"check permissions and retry)"
            ) from err
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    return _atomic_write(path, partial(_write_chunks, data=data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """`safetensors.torch.save_file`, atomically; tensors are made contiguous CPU copies."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = safetensors.torch.save(tensors, metadata=dict(metadata) if metadata else None)
    return atomic_write_bytes(path, data)


def _fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` (what ``_atomic_write`` does for one file)."""
    for file in (p for p in folder.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in the yielded temporary folder beside ``path``; when the body returns, it
    is renamed into place. ``path`` is then either the previous folder or the complete new one:
    a reader never sees a half-written folder, and a failed body leaves no temp folder behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would make the result private
    except OSError as err:
        raise AtomicWriteError(f"could not write {path}: {err.strerror or err}") from err
    try:
        yield staging
        _fsync_tree(staging)
        previous = None
        if path.exists():  # a folder cannot be replaced in one rename: move the old one aside first
            previous = path.with_name(f".{path.name}.old")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(path, previous)
        os.replace(staging, path)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, AtomicWriteError):
            raise AtomicWriteError(f"could not write {path}: {err.strerror or err} (nothing was "
                                   "replaced; free space or check permissions and retry)") from err
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    _fsync_dir(path.parent)
