"""The candidates folder contract shared by every ``sipo-pairs`` step.

    DIR/candidates.jsonl   one `Candidate` a line (JSON), appended as candidates finish
    DIR/images/<id>.png    the decoded sample (video families: <id>.mp4)
    DIR/latents/<id>.safetensors   the sampler's final latents (key "latents"), so training can
                                   use a candidate without a VAE encode

Paths in a record are relative to DIR. A line is appended only after its image and latents are
written (atomically), so a killed `sample` never leaves a record pointing at a half-written file,
and re-running skips every id already recorded.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

CANDIDATES_FILE = "candidates.jsonl"
IMAGES_DIR = "images"
LATENTS_DIR = "latents"


class CandidatesError(ValueError):
    """A candidates folder or file is missing or malformed; the message is one line."""


@dataclass(frozen=True)
class Candidate:
    """One sample of one prompt.

    `id` is unique in its folder ("p00003-c01": prompt 3, candidate 1); `settings` holds the
    sampler settings (sampler, steps, guidance_scale, width, height, frames...); `model` names what
    sampled it (family, pretrained_model_name_or_path, network_weights and its sha256, or None).
    """

    id: str
    prompt: str
    prompt_index: int
    candidate_index: int
    seed: int
    path: str
    latents: str | None = None
    negative_prompt: str = ""
    settings: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def candidate_id(prompt_index: int, candidate_index: int) -> str:
    return f"p{prompt_index:05d}-c{candidate_index:02d}"


def read_candidates(folder: str | os.PathLike) -> list[Candidate]:
    """Every candidate of `folder`, in file order; one-line errors naming the file and line."""
    path = Path(folder) / CANDIDATES_FILE
    if not path.is_file():
        raise CandidatesError(f"{path}: no candidates file (run `sipo-pairs sample --out "
                              f"{folder}` first)")
    names = {f.name for f in Candidate.__dataclass_fields__.values()}
    out: list[Candidate] = []
    seen: set[str] = set()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if not raw.endswith(b"\n"):
                break  # the last line of a killed writer: not recorded yet
            try:
                row = json.loads(raw.decode("utf-8"))
                record = Candidate(**{k: v for k, v in row.items() if k in names})
            except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
                raise CandidatesError(f"{path}:{number}: not a candidate record ({err}); "
                                      f"remove the line or re-run `sipo-pairs sample`") from err
            if record.id in seen:
                raise CandidatesError(f"{path}:{number}: duplicate candidate id {record.id!r}")
            seen.add(record.id)
            out.append(record)
    return out


def drop_unterminated_tail(path: str | os.PathLike) -> None:
    """Cut a last line without its newline (a writer killed mid-line) so that the next append
    starts a fresh line instead of gluing onto the fragment."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def append_candidate(folder: str | os.PathLike, record: Candidate) -> None:
    """Append one record and flush it to disk before returning (a kill loses no finished one)."""
    path = Path(folder) / CANDIDATES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_unterminated_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(record.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())
