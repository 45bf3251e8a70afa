"""Preference pairs from scored candidates of the same prompt (``sipo-pairs make``, whose command
line is make_command.py).

The rewards combine into one score per candidate (`sipo_plugin.rewards.combine_scores`: the
weighted sum of per-reward z-scores over the whole candidate set), so a margin is in units of
standard deviations of the rewards. Per prompt (candidates with the same ``prompt_index``):

    best_worst   one pair: the highest against the lowest combined score
    all          every two candidates; the higher one is chosen

A candidate whose image has the same content as an earlier candidate of its prompt is dropped
(equal images); a pair with margin 0 is a tie and a pair with margin below ``--min_margin`` is
dropped too; each is counted. The manifest is the project's JSONL pair format (``prompt``,
``chosen``, ``rejected``, paths relative to the manifest) plus ``chosen_id`` / ``rejected_id``,
``margin``, the raw per-reward scores, and ``chosen_latents`` / ``rejected_latents`` when the
candidates have saved latents. A histogram of the margins is written beside it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.errors import PairDataError
from ..utils.io import atomic_write_bytes, atomic_write_text
from .candidates import Candidate, read_candidates
from .score import ScoresError, load_scores

STRATEGIES = ("best_worst", "all")


@dataclass(frozen=True)
class Pair:
    """``chosen`` beats ``rejected`` (same prompt) by ``margin`` > 0 in combined score."""

    chosen: Candidate
    rejected: Candidate
    margin: float


@dataclass
class PairCounts:
    """What `make_pairs` kept and dropped. ``considered_margins``: margin of every pair looked at
    (distinct images), for the histogram."""

    prompts: int = 0
    candidates: int = 0
    pairs: int = 0
    equal_images: int = 0  # candidates dropped: same content as an earlier one of their prompt
    ties: int = 0  # pairs dropped: margin exactly 0
    below_margin: int = 0  # pairs dropped: 0 < margin < min_margin
    single: int = 0  # prompts with fewer than two distinct images
    considered_margins: list[float] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.pairs} pairs from {self.candidates} candidates of {self.prompts} prompts; "
                f"dropped: {self.equal_images} equal images, {self.ties} ties, "
                f"{self.below_margin} below min_margin, {self.single} prompts with < 2 "
                f"distinct images")


def _group_by_prompt(candidates: Sequence[Candidate]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for index, candidate in enumerate(candidates):
        groups.setdefault(candidate.prompt_index, []).append(index)
    return dict(sorted(groups.items()))


def _distinct(members: list[int], identity: Sequence[str], counts: PairCounts) -> list[int]:
    seen, kept = set(), []
    for i in members:
        if identity[i] in seen:
            counts.equal_images += 1
        else:
            seen.add(identity[i])
            kept.append(i)
    return kept


def make_pairs(candidates: Sequence[Candidate], combined: Sequence[float], identity: Sequence[str],
               *, strategy: str = "best_worst", min_margin: float = 0.0
               ) -> tuple[list[Pair], PairCounts]:
    """Pairs of same-prompt candidates from their combined scores (see the module docstring).

    ``combined[i]`` and ``identity[i]`` (content identity of its image) belong to
    ``candidates[i]``. Pure: reads no files.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not min_margin >= 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    counts = PairCounts(candidates=len(candidates))
    pairs: list[Pair] = []
    for members in _group_by_prompt(candidates).values():
        counts.prompts += 1
        kept = _distinct(members, identity, counts)
        if len(kept) < 2:
            counts.single += 1
            continue
        if strategy == "best_worst":
            best = max(kept, key=lambda i: combined[i])
            worst = min(kept, key=lambda i: combined[i])
            options = [(best, worst)] if best != worst else [(kept[0], kept[1])]
        else:
            options = [(a, b) for n, a in enumerate(kept) for b in kept[n + 1:]]
        for a, b in options:
            high, low = (a, b) if combined[a] >= combined[b] else (b, a)
            margin = float(combined[high] - combined[low])
            counts.considered_margins.append(margin)
            if margin == 0:
                counts.ties += 1
            elif margin < min_margin:
                counts.below_margin += 1
            else:
                pairs.append(Pair(candidates[high], candidates[low], margin))
    counts.pairs = len(pairs)
    return pairs, counts


def parse_weights(items: Sequence[str]) -> dict[str, float]:
    """``["pickscore=1", "aesthetic=0.5"]`` -> {"pickscore": 1.0, "aesthetic": 0.5}."""
    weights = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not sep or not name or weight is None:
            raise ValueError(f"--reward_weight {item!r}: give NAME=WEIGHT, e.g. pickscore=1.0")
        weights[name] = weight
    return weights


def combined_scores(candidates: Sequence[Candidate], scores: Mapping[str, Mapping[str, float]],
                    weights: Mapping[str, float], scores_file: Path) -> torch.Tensor:
    """`combine_scores` over the candidates; the rewards used are ``weights``' names, or every
    reward in the file. ScoresError naming the first candidate without a needed score."""
    from ..rewards import combine_scores
    names = list(weights) or sorted({name for s in scores.values() for name in s})
    if not names:
        raise ScoresError(f"{scores_file}: no scores; run `sipo-pairs score --candidates "
                          f"{scores_file.parent} --reward ...` first")
    for candidate in candidates:
        missing = [n for n in names if n not in scores.get(candidate.id, {})]
        if missing:
            raise ScoresError(f"{scores_file}: candidate {candidate.id!r} has no "
                              f"{', '.join(missing)} score; run `sipo-pairs score --candidates "
                              f"{scores_file.parent} --reward ...` for it first")
    table = {n: torch.tensor([scores[c.id][n] for c in candidates], dtype=torch.float64)
             for n in names}
    return combine_scores(table, weights)


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def pair_record(pair: Pair, folder: Path, out_dir: Path,
                scores: Mapping[str, Mapping[str, float]]) -> dict:
    """One manifest row: the JSONL pair format plus ids, margin, scores and latents."""
    row = {
        "prompt": pair.chosen.prompt,
        "chosen": _relative(folder / pair.chosen.path, out_dir),
        "rejected": _relative(folder / pair.rejected.path, out_dir),
        "chosen_id": pair.chosen.id,
        "rejected_id": pair.rejected.id,
        "margin": round(pair.margin, 6),
        "chosen_scores": dict(scores[pair.chosen.id]),
        "rejected_scores": dict(scores[pair.rejected.id]),
    }
    if pair.chosen.negative_prompt:
        row["negative_prompt"] = pair.chosen.negative_prompt
    if pair.chosen.latents and pair.rejected.latents:
        row["chosen_latents"] = _relative(folder / pair.chosen.latents, out_dir)
        row["rejected_latents"] = _relative(folder / pair.rejected.latents, out_dir)
    return row


def write_margin_histogram(counts: PairCounts, min_margin: float, path: Path) -> Path:
    """PNG: margins of every pair looked at, the cut at ``min_margin``; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(counts.considered_margins or [0.0], bins=40, color="C0")
    if min_margin > 0:
        ax.axvline(min_margin, color="C3", ls="--", lw=1, label=f"min_margin = {min_margin:g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("margin (combined z-score, chosen - rejected)")
    ax.set_ylabel("pairs")
    ax.set_title(f"{counts.pairs} pairs kept of {len(counts.considered_margins)}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def histogram_path(out: Path) -> Path:
    return out.with_name(out.stem + ".margins.png")


def make_manifest(folder: str | os.PathLike, out: str | os.PathLike, *,
                  strategy: str = "best_worst", min_margin: float = 0.0,
                  weights: Mapping[str, float] | None = None) -> PairCounts:
    """Read DIR's candidates and scores (checked), write the manifest ``out`` and its margin
    histogram (both atomically); returns the counts."""
    folder, out = Path(folder), Path(out)
    candidates = read_candidates(folder)
    table = load_scores(folder, candidates)
    combined = combined_scores(candidates, table.scores, dict(weights or {}),
                               folder / "scores.jsonl")
    identity = [table.identity[c.id] for c in candidates]
    pairs, counts = make_pairs(candidates, combined.tolist(), identity, strategy=strategy,
                               min_margin=min_margin)
    if not pairs:
        raise PairDataError(f"{folder}: no pairs ({counts.summary()}); lower --min_margin or "
                            f"sample more candidates per prompt")
    rows = [pair_record(p, folder, out.parent, table.scores) for p in pairs]
    atomic_write_text(out, "".join(json.dumps(row) + "\n" for row in rows))
    write_margin_histogram(counts, min_margin, histogram_path(out))
    return counts
