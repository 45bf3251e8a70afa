"""DIR/labels.jsonl: an append-only log of labels, undos and the schedule's seed.

    {"type": "schedule", "seed": 0, "time": ...}                                  first line
    {"type": "label", "id": "L...", "prompt_index": 3, "left": ID, "right": ID,
     "outcome": "left" | "right" | "tie" | "skip", "time": ...}
    {"type": "undo", "id": "U...", "undoes": "L...", "time": ...}

Every record is one `os.write` of a whole line to a file opened with O_APPEND, then fsync, before
the server answers; the file is never rewritten. A writer killed mid-line leaves an unterminated
last line: readers ignore it and the next server cuts it off before appending. One server per
folder holds DIR/labels.lock (an flock, so the kernel releases it when the server dies).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; one server per folder is then the user's to keep
    fcntl = None

LABELS_FILE = "labels.jsonl"
LOCK_FILE = "labels.lock"
OUTCOMES = ("left", "right", "tie", "skip")


class LabelsError(ValueError):
    """A labels file is malformed or the folder is in use; the message is one line."""


@dataclass(frozen=True)
class Label:
    """One effective label (not undone): `left` and `right` as shown, the outcome."""

    id: str
    prompt_index: int
    left: str
    right: str
    outcome: str

    @property
    def winner(self) -> str | None:
        return {"left": self.left, "right": self.right}.get(self.outcome)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every complete line; an unterminated last line is skipped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                return  # a writer killed mid-line: that label was never acknowledged
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict) or row.get("type") not in ("schedule", "label", "undo"):
                    raise ValueError("no known 'type'")
                yield number, row
            except (UnicodeDecodeError, ValueError) as err:
                raise LabelsError(f"{path}:{number}: not a label record ({err}); the file is "
                                  f"append-only, so this line was edited by hand: remove it") from err


def _label_of(path: Path, number: int, row: dict) -> Label:
    try:
        label = Label(id=str(row["id"]), prompt_index=int(row["prompt_index"]),
                      left=str(row["left"]), right=str(row["right"]), outcome=str(row["outcome"]))
    except (KeyError, TypeError, ValueError) as err:
        raise LabelsError(f"{path}:{number}: label record without {err}; remove the line") from err
    if label.outcome not in OUTCOMES:
        raise LabelsError(f"{path}:{number}: unknown outcome {label.outcome!r}; remove the line")
    return label


def read_labels(folder: str | os.PathLike) -> tuple[int | None, list[Label]]:
    """(the schedule seed or None, the effective labels in file order: undone ones removed)."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None, []
    seed, labels = None, {}
    for number, row in _records(path):
        if row["type"] == "schedule" and seed is None:
            seed = int(row.get("seed", 0))
        elif row["type"] == "label":
            label = _label_of(path, number, row)
            labels[label.id] = label
        elif row["type"] == "undo":
            labels.pop(str(row.get("undoes")), None)
    return seed, list(labels.values())


class LabelLog:
    """The open labels file of a running server: holds the folder's lock, appends durably."""

    def __init__(self, folder: str | os.PathLike, seed: int | None = None, owner: str = ""):
        """Lock the folder, cut a torn last line, open the file; `seed` None: the file's or 0."""
        self.path = Path(folder) / LABELS_FILE
        self._lock_fd = _take_lock(Path(folder) / LOCK_FILE, owner)
        try:
            self.torn_bytes = _cut_torn_tail(self.path)
            existing, self.labels = read_labels(folder)
            if existing is not None and seed is not None and existing != seed:
                raise LabelsError(f"{self.path}: labelled with --seed {existing}, not {seed}; "
                                  f"drop --seed (the file's seed is used) or use another folder")
            self.seed = existing if existing is not None else (seed or 0)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if existing is None:  # a new file: persist its folder entry too
                self._append({"type": "schedule", "seed": self.seed, "time": _now()})
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except BaseException:
            self.close()
            raise

    def add_label(self, prompt_index: int, left: str, right: str, outcome: str) -> Label:
        """Append one label and fsync it; returns it."""
        label = Label(id="L" + uuid.uuid4().hex[:12], prompt_index=prompt_index, left=left,
                      right=right, outcome=outcome)
        self._append({"type": "label", **asdict(label), "time": _now()})
        return label

    def add_undo(self, label_id: str) -> None:
        """Append an undo record for `label_id` and fsync it."""
        self._append({"type": "undo", "id": "U" + uuid.uuid4().hex[:12], "undoes": label_id,
                      "time": _now()})

    def _append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        if written != len(line):  # a full disk: the line is torn; the next start cuts it off
            raise OSError(f"{self.path}: only {written} of {len(line)} bytes written")
        os.fsync(self._fd)

    def close(self) -> None:
        for name in ("_fd", "_lock_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def _take_lock(path: Path, owner: str) -> int:
    """flock `path` (non-blocking) and write `owner` into it; one clear line if it is held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 500).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise LabelsError(f"{path}: this folder is being labelled by {holder}; open that page "
                          f"or stop that server first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode("utf-8"), 0)
    return fd


def _cut_torn_tail(path: Path) -> int:
    """Truncate an unterminated last line (a kill mid-write); returns the bytes removed."""
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep == len(data):
            return 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return len(data) - keep

