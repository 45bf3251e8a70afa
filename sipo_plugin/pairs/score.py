"""``sipo-pairs score``: score every candidate with one or more rewards, into DIR/scores.jsonl.

One JSON line per candidate and scoring batch:

    {"id": "p00003-c01", "image": "52311:5f2a0c1de39b4a77",
     "scores": {"pickscore": 21.37}, "rewards": {"pickscore": "pickscore=/models/PickScore_v1"}}

``image`` is the content identity of the candidate's file when it was scored (`content_identity`:
size in bytes and a sha256 prefix), so a scores file from other candidates, or an image replaced
or deleted since, is caught before pairs are made from it. ``rewards`` records each score's
canonical spec: one reward name means one model throughout a file.

Resumable: re-running skips (candidate, reward) pairs already scored for the current image and
scores the rest (images changed since are scored again). Lines are appended, flushed and fsynced
once per batch; a killed run leaves at most a partial last line, which readers ignore and the
next run cuts off before appending.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ..data.errors import PairDataError
from ..data.images import IMAGE_EXTENSIONS, open_rgb
from .candidates import Candidate, CandidatesError, drop_unterminated_tail, read_candidates

SCORES_FILE = "scores.jsonl"
IDENTITY_HEX = 16  # sha256 hex digits kept: 64 bits, ample to tell a folder's images apart
_RESCORE_FIX = "re-run `sipo-pairs score --candidates {folder} --reward ...` to score it again"


class ScoresError(ValueError):
    """A scores file that does not match its candidates; the message is one line with the fix."""


# ---------------------------------------------------------------------------------------------
# Candidate files: content identity and decoding


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _identity(size: int, digest) -> str:
    return f"{size}:{digest.hexdigest()[:IDENTITY_HEX]}"


def content_identity(path: str | os.PathLike) -> str:
    """``"<bytes>:<sha256 prefix>"`` of a file; of a frame folder, over its image files in name
    order (names and bytes). FileNotFoundError if it is gone."""
    path = Path(path)
    digest, size = hashlib.sha256(), 0
    files = _frame_files(path) if path.is_dir() else [path]
    for file in files:
        data = file.read_bytes()
        if path.is_dir():
            digest.update(file.name.encode() + b"\0")
        digest.update(data)
        size += len(data)
    return _identity(size, digest)


def is_clip(path: Path) -> bool:
    """A candidate of a video family: a frame folder, or a file that is not a still image."""
    return path.is_dir() or path.suffix.lower() not in IMAGE_EXTENSIONS


def read_clip_frames(path: Path) -> list[Image.Image]:
    """Every frame of a clip (frame folder, GIF, or a video file through PyAV), as RGB images."""
    if path.is_dir():
        return [open_rgb(p) for p in _frame_files(path)]
    if path.suffix.lower() == ".gif":
        with Image.open(path) as gif:
            frames = []
            for index in range(getattr(gif, "n_frames", 1)):
                gif.seek(index)
                frames.append(gif.convert("RGB"))
            return frames
    from ..data.video import _import_av
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            return [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
    except av.error.FFmpegError as err:  # not all of them are OSErrors
        raise ValueError(str(err)) from err


# ---------------------------------------------------------------------------------------------
# Reading scores.jsonl


@dataclass
class ScoreTable:
    """What a scores file says, checked against its candidates.

    ``scores``: id -> reward -> score (of the candidate's latest recorded image); ``identity``: id
    -> that image's content identity; ``specs``: reward -> canonical spec; ``line``: id -> line
    number of its latest record; ``stale``: ids whose file changed since it was scored.
    """

    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    identity: dict[str, str] = field(default_factory=dict)
    specs: dict[str, str] = field(default_factory=dict)
    line: dict[str, int] = field(default_factory=dict)
    stale: set[str] = field(default_factory=set)


def _parse_line(raw: bytes, where: str) -> dict:
    try:
        row = json.loads(raw.decode("utf-8"))
        if not (isinstance(row, dict) and isinstance(row.get("id"), str)
                and isinstance(row.get("image"), str) and isinstance(row.get("scores"), dict)
                and isinstance(row.get("rewards"), dict)):
            raise ValueError("needs id, image, scores, rewards")
        row["scores"] = {k: float(v) for k, v in row["scores"].items()}
    except (UnicodeDecodeError, ValueError, TypeError) as err:
        raise ScoresError(f"{where}: not a score record ({err}); remove the line, or move the "
                          f"file away and re-run `sipo-pairs score`") from None
    return row


def _merge_row(table: ScoreTable, row: dict, path: Path, number: int) -> None:
    for reward, spec in row["rewards"].items():
        known = table.specs.setdefault(reward, spec)
        if known != spec:
            raise ScoresError(f"{path}:{number}: reward {reward!r} scored with {spec!r}, earlier "
                              f"lines with {known!r}; one file holds one model per reward name "
                              f"(move the file away to score with the new model)")
    cid = row["id"]
    if table.identity.get(cid) != row["image"]:
        table.scores[cid] = {}  # a new image: earlier scores were of the old one
    table.identity[cid] = row["image"]
    table.scores[cid].update(row["scores"])
    table.line[cid] = number


def load_scores(folder: str | os.PathLike, candidates: Sequence[Candidate] | None = None, *,
                allow_stale: bool = False) -> ScoreTable:
    """DIR/scores.jsonl (an empty table if absent), checked against DIR's candidates and files.

    ScoresError (one line: the file and the fix) for a record of a candidate that is not in
    candidates.jsonl, a reward scored with two models, and, unless ``allow_stale`` (then listed
    in ``stale``), a scored image that changed since; PairDataError for a scored image that is
    gone.
    """
    folder = Path(folder)
    candidates = read_candidates(folder) if candidates is None else candidates
    by_id = {c.id: c for c in candidates}
    path = folder / SCORES_FILE
    table = ScoreTable()
    if not path.is_file():
        return table
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip() or not raw.endswith(b"\n"):
                continue  # blank, or the partial last line of a killed run
            row = _parse_line(raw, f"{path}:{number}")
            if row["id"] not in by_id:
                raise ScoresError(f"{path}:{number}: candidate {row['id']!r} is not in "
                                  f"{folder / 'candidates.jsonl'}: the scores are from other "
                                  f"candidates; move {path.name} away and re-run `sipo-pairs score`")
            _merge_row(table, row, path, number)
    for cid, recorded in table.identity.items():
        image = folder / by_id[cid].path
        if not image.exists():
            raise PairDataError(f"{image}: candidate image missing (scored at {path.name} line "
                                f"{table.line[cid]}); restore it, or remove candidate {cid!r} "
                                f"from candidates.jsonl and {path.name}")
        if content_identity(image) != recorded:
            table.stale.add(cid)
    if table.stale and not allow_stale:
        cid = min(table.stale, key=table.line.__getitem__)
        share = f"{len(table.stale)} of {len(table.identity)} scored images differ"
        raise ScoresError(f"{folder / by_id[cid].path}: changed since it was scored ({path.name} "
                          f"line {table.line[cid]}; {share}: if all, the file is from other "
                          f"candidates); " + _RESCORE_FIX.format(folder=folder))
    return table


def read_scores(folder: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Candidate id -> reward name -> score, from DIR/scores.jsonl, checked (see `load_scores`)."""
    return load_scores(folder).scores


# ---------------------------------------------------------------------------------------------
# Scoring


def _identity_and_media(path: Path) -> tuple[str, Image.Image | list[Image.Image]]:
    """Content identity and decoded media (a still image, or a clip's frames), reading a still
    image's bytes once; PairDataError naming the file if it is missing or does not decode."""
    if not path.exists():
        raise PairDataError(f"{path}: candidate image missing (deleted after sampling?); restore "
                            f"it, or remove its line from candidates.jsonl")
    try:
        if is_clip(path):
            frames = read_clip_frames(path)
            if not frames:
                raise ValueError("no frames")
            return content_identity(path), frames
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            media = img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise PairDataError(f"{path}: cannot decode candidate ({type(err).__name__}: {err}); "
                            f"re-sample it or remove its line from candidates.jsonl") from err
    return _identity(len(data), hashlib.sha256(data)), media


def _check_specs(table: ScoreTable, rewards: Sequence, path: Path) -> None:
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ScoresError(f"two rewards named the same ({', '.join(names)}); score them into "
                          f"separate candidate folders or pick one")
    for reward in rewards:
        known = table.specs.get(reward.name)
        if known is not None and known != reward.spec:
            raise ScoresError(f"{path}: {reward.name!r} was scored with {known!r}, now "
                              f"{reward.spec!r}; move {path.name} away to score with the new model")


def _score_batch(batch: Sequence[Candidate], folder: Path, rewards: Sequence, todo: dict,
                 frame_stride: int, batch_size: int) -> list[dict]:
    """One record per candidate of ``batch``: its identity and the scores of ``todo[id]``."""
    loaded = [_identity_and_media(folder / c.path) for c in batch]
    rows = [{"id": c.id, "image": identity, "scores": {}, "rewards": {}}
            for c, (identity, _) in zip(batch, loaded)]
    for reward in rewards:
        picked = [i for i, c in enumerate(batch) if reward.name in todo[c.id]]
        stills = [i for i in picked if not isinstance(loaded[i][1], list)]
        clips = [i for i in picked if isinstance(loaded[i][1], list)]
        if stills:
            values = reward.score([loaded[i][1] for i in stills], [batch[i].prompt for i in stills])
            for i, value in zip(stills, values.tolist()):
                rows[i]["scores"][reward.name] = value
        if clips:
            values = reward.score_clips([loaded[i][1] for i in clips],
                                        [batch[i].prompt for i in clips], frame_stride, batch_size)
            for i, value in zip(clips, values.tolist()):
                rows[i]["scores"][reward.name] = value
        for i in picked:
            rows[i]["rewards"][reward.name] = reward.spec
    return rows


def score_candidates(folder: str | os.PathLike, rewards: Sequence, *, batch_size: int = 8,
                     frame_stride: int = 4, progress: bool = True) -> dict[str, dict[str, float]]:
    """Score every candidate of ``folder`` with every reward (built by `build_reward`), appending
    to DIR/scores.jsonl; returns `read_scores` of the result.

    Skips what is already scored for the current image (resumable); scores changed images again.
    ``batch_size`` candidates are decoded and scored at a time (a clip's frames are scored
    ``batch_size`` at a time too); clips score the mean over every ``frame_stride``-th frame.
    """
    if batch_size < 1 or frame_stride < 1:
        raise ValueError(f"batch_size and frame_stride must be >= 1, got {batch_size}, {frame_stride}")
    if not rewards:
        raise ValueError("no rewards to score with (give --reward NAME[=PATH])")
    folder = Path(folder)
    candidates = read_candidates(folder)
    path = folder / SCORES_FILE
    table = load_scores(folder, candidates, allow_stale=True)
    _check_specs(table, rewards, path)
    todo = {}
    for c in candidates:
        have = {} if c.id in table.stale else table.scores.get(c.id, {})
        missing = {r.name for r in rewards} - set(have)
        if missing:
            todo[c.id] = missing
    pending = [c for c in candidates if c.id in todo]
    bar = tqdm(total=len(pending), desc="score", unit="cand", disable=not progress)
    if pending:
        drop_unterminated_tail(path)  # a killed run's partial last line
        with open(path, "a", encoding="utf-8") as out:
            for start in range(0, len(pending), batch_size):
                batch = pending[start:start + batch_size]
                rows = _score_batch(batch, folder, rewards, todo, frame_stride, batch_size)
                out.write("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
                out.flush()
                os.fsync(out.fileno())
                bar.update(len(batch))
    bar.close()
    return read_scores(folder)


# ---------------------------------------------------------------------------------------------
# Command line


def add_reward_arguments(parser: argparse.ArgumentParser) -> None:
    """--reward (repeatable), --device, --list-rewards: shared by the commands that score."""
    parser.add_argument("--reward", action="append", default=[], metavar="SPEC",
                        help="a reward: NAME, NAME=PATH (its model folder or file) or "
                        "package.module:function (your code, run in this process); repeat for "
                        "several. --list-rewards shows them all; README 'Reward models'")
    parser.add_argument("--device", default=None,
                        help="device the reward models run on (default: cuda if available, else cpu)")
    parser.add_argument("--list-rewards", action="store_true",
                        help="print every registered reward with its spec form, then stop")


def print_rewards() -> None:
    from ..rewards import describe_rewards
    for name, description in describe_rewards().items():
        print(f"{name:16s} {description}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidates", metavar="DIR", help="the candidates folder (from `sample`)")
    add_reward_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=8,
                        help="candidates decoded and scored at a time (default 8)")
    parser.add_argument("--frame_stride", type=int, default=4,
                        help="video candidates: score the mean over every k-th frame (default 4)")


def run(args: argparse.Namespace) -> int:
    if args.list_rewards:
        print_rewards()
        return 0
    from ..rewards import RewardError, build_reward
    if not args.candidates or not args.reward:
        print("error: give --candidates DIR and at least one --reward SPEC (--list-rewards)",
              file=sys.stderr)
        return 2
    try:
        rewards = [build_reward(spec, device=args.device) for spec in args.reward]
        scores = score_candidates(args.candidates, rewards, batch_size=args.batch_size,
                                  frame_stride=args.frame_stride)
    except (CandidatesError, ScoresError, RewardError, PairDataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every finished batch is in scores.jsonl; re-run to go on",
              file=sys.stderr)
        return 130
    print(f"{len(scores)} candidates scored with {', '.join(r.name for r in rewards)}: "
          f"{Path(args.candidates) / SCORES_FILE}")
    return 0
