"""Pairs from hand labels (DIR/labels.jsonl), for ``sipo-pairs make --from-labels``.

    best_worst   per prompt whose schedule is finished: the best against the worst by the
                 labels' score (wins - losses, Buchholz, see `schedule.best_and_worst`); for a
                 Swiss schedule that pair may never have been shown side by side ("inferred")
    all          every labelled pair with a winner

Ties and skips are dropped and counted; so are best_worst prompts not finished. When DIR also has
reward scores, labels win: prompts with labels take their pairs from the labels, the others from
the rewards (`make.make_pairs`), and the summary says how often the rewards agree with the labels.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sipo_plugin.data.errors import PairDataError
from sipo_plugin.pairs import make
from sipo_plugin.pairs.candidates import Candidate, read_candidates
from sipo_plugin.pairs.label.schedule import SKIP, best_and_worst, pair_key, plan_prompt
from sipo_plugin.pairs.label.session import decisions_of, group_by_prompt
from sipo_plugin.pairs.label.store import LABELS_FILE, LabelsError, read_labels
from sipo_plugin.pairs.score import SCORES_FILE, load_scores
from sipo_plugin.utils.io import atomic_write_text

STRATEGIES = ("best_worst", "all")


@dataclass(frozen=True)
class LabelledPair:
    """`chosen` is preferred over `rejected`; `inferred`: never shown side by side."""

    chosen: Candidate
    rejected: Candidate
    inferred: bool = False


@dataclass
class LabelCounts:
    labels: int = 0  # effective labels (undone ones removed)
    prompts_labelled: int = 0
    pairs: int = 0
    inferred: int = 0  # best_worst pairs resolved from the schedule, not shown side by side
    ties: int = 0  # labelled ties (all) or prompts whose best and worst tie (best_worst)
    skips: int = 0
    unfinished: int = 0  # best_worst: prompts whose schedule still has pairs to label
    unknown: int = 0  # labels naming candidates no longer in candidates.jsonl

    def summary(self) -> str:
        return (f"{self.pairs} pairs from {self.labels} labels of {self.prompts_labelled} "
                f"prompts ({self.inferred} inferred from the schedule); dropped: {self.ties} "
                f"ties, {self.skips} skips, {self.unfinished} unfinished prompts, "
                f"{self.unknown} labels of unknown candidates")


def pairs_from_labels(folder: str | os.PathLike, strategy: str = "best_worst",
                      candidates: list[Candidate] | None = None
                      ) -> tuple[list[LabelledPair], LabelCounts]:
    """The labelled pairs of `folder` (see the module docstring), in prompt order."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    folder = Path(folder)
    candidates = read_candidates(folder) if candidates is None else candidates
    by_id = {c.id: c for c in candidates}
    seed, labels = read_labels(folder)
    counts = LabelCounts()
    known = [lab for lab in labels if lab.left in by_id and lab.right in by_id]
    counts.unknown, counts.labels = len(labels) - len(known), len(known)
    counts.skips = sum(lab.outcome == "skip" for lab in known)
    decisions = decisions_of(known)
    pairs: list[LabelledPair] = []
    for group in group_by_prompt(candidates):
        decided = decisions.get(group.prompt_index)
        if not decided:
            continue
        counts.prompts_labelled += 1
        if strategy == "all":
            for key, outcome in decided.items():
                if outcome in key:
                    loser = key[1] if outcome == key[0] else key[0]
                    pairs.append(LabelledPair(by_id[outcome], by_id[loser]))
                elif outcome != SKIP:
                    counts.ties += 1
            continue
        if plan_prompt(group.ids, decided, seed or 0)[0]:
            counts.unfinished += 1
            continue
        resolved = best_and_worst(group.ids, decided, seed or 0)
        if resolved is None:
            counts.ties += 1
            continue
        inferred = decided.get(pair_key(*resolved)) != resolved[0]
        pairs.append(LabelledPair(by_id[resolved[0]], by_id[resolved[1]], inferred))
        counts.inferred += inferred
    counts.pairs = len(pairs)
    return pairs, counts


def write_label_manifest(folder: str | os.PathLike, out: str | os.PathLike, *,
                         strategy: str = "best_worst", min_margin: float = 0.0,
                         weights: Mapping[str, float] | None = None) -> str:
    """Write the pair manifest `out` from labels, over reward scores when DIR has them (see the
    module docstring); atomically. Returns the summary line."""
    folder, out = Path(folder), Path(out)
    if not (folder / LABELS_FILE).is_file():
        raise LabelsError(f"{folder / LABELS_FILE}: no labels; run `sipo-pairs label "
                          f"--candidates {folder}` first")
    candidates = read_candidates(folder)
    labelled, counts = pairs_from_labels(folder, strategy, candidates)
    pairs = [make.Pair(p.chosen, p.rejected, float("nan")) for p in labelled]
    scores: Mapping[str, Mapping[str, float]] = defaultdict(dict)
    summary = f"labels: {counts.summary()}"
    if (folder / SCORES_FILE).is_file():
        table = load_scores(folder, candidates)
        scores = table.scores
        combined = dict(zip((c.id for c in candidates), make.combined_scores(
            candidates, scores, dict(weights or {}), folder / SCORES_FILE).tolist()))
        pairs = [make.Pair(p.chosen, p.rejected, combined[p.chosen.id] - combined[p.rejected.id])
                 for p in pairs]
        agree = sum(p.margin > 0 for p in pairs)
        taken = {lab.prompt_index for lab in read_labels(folder)[1]}
        rest = [c for c in candidates if c.prompt_index not in taken]
        reward_pairs, reward_counts = make.make_pairs(
            rest, [combined[c.id] for c in rest], [table.identity[c.id] for c in rest],
            strategy=strategy, min_margin=min_margin)
        pairs += reward_pairs
        summary += (f"; the rewards agree with {agree} of {len(labelled)} labelled pairs; "
                    f"unlabelled prompts by reward: {reward_counts.summary()}")
    if not pairs:
        raise PairDataError(f"{folder}: no pairs ({summary}); label more prompts")
    rows = []
    for n, pair in enumerate(pairs):
        row = make.pair_record(pair, folder, out.parent, scores)
        row["source"] = "label" if n < len(labelled) else "reward"
        if row["source"] == "label":
            row["inferred"] = labelled[n].inferred
        if pair.margin != pair.margin:  # no scores: a label has no margin
            for key in ("margin", "chosen_scores", "rejected_scores"):
                row.pop(key)
        rows.append(row)
    atomic_write_text(out, "".join(json.dumps(row) + "\n" for row in rows))
    return summary
