"""The labelling session: every prompt's schedule, kept current as labels arrive.

One `LabelSession` per server; its methods hold one lock, so concurrent requests (two tabs) are
serialized: a label is checked against the current schedule, appended and fsynced, and only then
is the next pair computed and returned.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sipo_plugin.pairs.candidates import Candidate
from sipo_plugin.pairs.label.schedule import SKIP, TIE, pair_key, plan_prompt
from sipo_plugin.pairs.label.store import OUTCOMES, Label, LabelLog

VIDEO_SUFFIXES = {".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime",
                  ".mkv": "video/x-matroska"}
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_FPS = 8


class RequestError(Exception):
    """A request the session refuses: an HTTP status and one line for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PromptGroup:
    """One prompt's candidates, in candidate order."""

    prompt_index: int
    prompt: str
    negative_prompt: str
    ids: tuple[str, ...]


def group_by_prompt(candidates: Iterable[Candidate]) -> list[PromptGroup]:
    """Candidates grouped by `prompt_index` (ascending), each group in `candidate_index` order."""
    groups: dict[int, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.prompt_index, []).append(c)
    return [PromptGroup(p, members[0].prompt, members[0].negative_prompt,
                        tuple(c.id for c in sorted(members, key=lambda c: c.candidate_index)))
            for p, members in sorted(groups.items())]


def decisions_of(labels: Iterable[Label]) -> dict[int, dict[tuple[str, str], str]]:
    """prompt_index -> {pair_key: winner id | TIE | SKIP}; a later label of a pair wins."""
    out: dict[int, dict[tuple[str, str], str]] = {}
    for label in labels:
        outcome = label.winner or {"tie": TIE, "skip": SKIP}[label.outcome]
        out.setdefault(label.prompt_index, {})[pair_key(label.left, label.right)] = outcome
    return out


def media_of(folder: Path, candidate: Candidate) -> dict:
    """How the page shows a candidate: an image, a looping video, or a folder of frames."""
    path = folder / candidate.path
    base = f"/media/{candidate.id}"
    if path.is_dir():
        frames = sorted(p.name for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        fps = candidate.settings.get("fps", DEFAULT_FPS)
        return {"id": candidate.id, "kind": "frames", "fps": fps,
                "frames": [f"{base}/{n}" for n in range(len(frames))]}
    kind = "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"
    return {"id": candidate.id, "kind": kind, "src": base}


class LabelSession:
    """Schedules, decisions and progress of every prompt of one candidates folder."""

    def __init__(self, folder: str | os.PathLike, candidates: Sequence[Candidate], log: LabelLog):
        self.folder = Path(folder)
        self.log = log
        self.by_id = {c.id: c for c in candidates}
        self.groups = group_by_prompt(candidates)
        self._position = {g.prompt_index: n for n, g in enumerate(self.groups)}
        self._labels: list[Label] = [label for label in log.labels
                                     if label.prompt_index in self._position]
        self._decisions = decisions_of(self._labels)
        self._plans: list[tuple[list, int, int]] = [([], 0, 0)] * len(self.groups)
        self._open: set[int] = set()  # positions of prompts with a pending pair
        self.done = self.planned = 0
        for position in range(len(self.groups)):
            self._replan(position)
        self._lock = threading.Lock()

    def _replan(self, position: int) -> None:
        group = self.groups[position]
        _, old_done, old_planned = self._plans[position]
        plan = plan_prompt(group.ids, self._decisions.get(group.prompt_index, {}),
                           self.log.seed)
        self._plans[position] = plan
        self.done += plan[1] - old_done
        self.planned += plan[2] - old_planned
        (self._open.add if plan[0] else self._open.discard)(position)

    def state(self) -> dict:
        """What the page shows: the next pair, the pair after it (to preload), the progress."""
        with self._lock:
            return self._state()

    def _state(self) -> dict:
        out = {"pair": None, "preload": [], "last": None,
               "progress": {"total": {"done": self.done, "planned": self.planned},
                            "prompts": len(self.groups),
                            "prompts_done": len(self.groups) - len(self._open)}}
        if self._labels:
            last = self._labels[-1]
            out["last"] = {"id": last.id, "outcome": last.outcome, "left": last.left,
                           "right": last.right, "prompt_index": last.prompt_index}
        if not self._open:
            return out
        position = min(self._open)
        group, (pending, done, planned) = self.groups[position], self._plans[position]
        left, right = pending[0]
        out["pair"] = {"prompt_index": group.prompt_index, "prompt": group.prompt,
                       "negative_prompt": group.negative_prompt,
                       "left": media_of(self.folder, self.by_id[left]),
                       "right": media_of(self.folder, self.by_id[right])}
        out["progress"]["prompt"] = {"done": done, "planned": planned}
        following = pending[1:2] or self._first_pending(position + 1)
        out["preload"] = [media_of(self.folder, self.by_id[i]) for p in following for i in p]
        return out

    def _first_pending(self, start: int) -> list[tuple[str, str]]:
        later = [p for p in self._open if p >= start]
        return self._plans[min(later)][0][:1] if later else []

    def label(self, left: object, right: object, outcome: object) -> dict:
        """Check the label against the schedule, append and fsync it, return the new state."""
        with self._lock:
            if outcome not in OUTCOMES:
                raise RequestError(400, f"outcome must be one of {', '.join(OUTCOMES)}")
            for name, cid in (("left", left), ("right", right)):
                if not isinstance(cid, str) or cid not in self.by_id:
                    raise RequestError(400, f"{name}: no candidate {cid!r} in this folder")
            prompt_index = self.by_id[left].prompt_index
            if self.by_id[right].prompt_index != prompt_index or left == right:
                raise RequestError(400, "left and right must be two candidates of one prompt")
            position = self._position[prompt_index]
            if pair_key(left, right) not in {pair_key(*p) for p in self._plans[position][0]}:
                raise RequestError(409, "this pair is already labelled (in another tab?) or "
                                        "not scheduled; showing the next one")
            label = self.log.add_label(prompt_index, left, right, outcome)
            self._labels.append(label)
            self._decisions.setdefault(prompt_index, {}).update(decisions_of([label])[prompt_index])
            self._replan(position)
            return self._state()

    def undo(self) -> dict:
        """Append an undo record for the last label (any tab's), return the new state."""
        with self._lock:
            if not self._labels:
                raise RequestError(409, "nothing to undo")
            label = self._labels[-1]
            self.log.add_undo(label.id)
            self._labels.pop()
            self._decisions[label.prompt_index] = decisions_of(
                [other for other in self._labels if other.prompt_index == label.prompt_index]
            ).get(label.prompt_index, {})
            self._replan(self._position[label.prompt_index])
            state = self._state()
            state["undone"] = {"id": label.id, "left": label.left, "right": label.right}
            return state

    def media_path(self, candidate_id: str, frame: int | None = None) -> Path | None:
        """The file to serve for a candidate (or one frame of a frame folder); None if none."""
        candidate = self.by_id.get(candidate_id)
        if candidate is None:
            return None
        path = (self.folder / candidate.path).resolve()
        if frame is not None:
            if not path.is_dir():
                return None
            frames = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
            return frames[frame] if 0 <= frame < len(frames) else None
        return path if path.is_file() else None
