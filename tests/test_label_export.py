"""Pairs from hand labels: best/worst resolved from a Swiss schedule, all decided pairs, ties and
skips dropped and counted, labels over reward scores; `sipo-pairs make --from-labels`."""

import json

import numpy as np
import pytest
from label_helpers import write_candidates

from sipo_plugin.data.pairs import read_pairs
from sipo_plugin.pairs.cli import main as sipo_pairs
from sipo_plugin.pairs.label.export import pairs_from_labels
from sipo_plugin.pairs.label.schedule import pair_key, plan_prompt
from sipo_plugin.pairs.label.session import group_by_prompt
from sipo_plugin.pairs.label.store import LabelLog
from sipo_plugin.pairs.score import score_candidates
from sipo_plugin.rewards import build_reward


def blueness(images, prompts):
    """A reward that disagrees with the labels below: less red (lower candidate index) is better."""
    return [float(255 - np.asarray(img)[..., 0].mean()) for img in images]


def _label(folder, outcome_of, stop=None):
    """Label every prompt's schedule; `outcome_of(prompt_index, left, right)` -> outcome."""
    from sipo_plugin.pairs.candidates import read_candidates
    from sipo_plugin.pairs.label.session import decisions_of
    log = LabelLog(folder, seed=5)
    labels = []
    for group in group_by_prompt(read_candidates(folder)):
        if stop is not None and group.prompt_index >= stop:
            break
        while True:
            pending = plan_prompt(group.ids, decisions_of(labels).get(group.prompt_index, {}),
                                  5)[0]
            if not pending:
                break
            left, right = pending[0]
            labels.append(log.add_label(group.prompt_index, left, right,
                                        outcome_of(group.prompt_index, left, right)))
    log.close()
    return labels


def redder(prompt_index, left, right):
    return "left" if left > right else "right"  # ids end in the candidate index


def test_best_worst_resolves_the_swiss_schedule_and_counts_drops(tmp_path):
    write_candidates(tmp_path, [2, 8, 3, 2])

    def outcome(p, left, right):
        return {0: "tie", 3: "skip"}.get(p) or redder(p, left, right)

    _label(tmp_path, outcome)
    pairs, counts = pairs_from_labels(tmp_path, "best_worst")
    assert [(p.chosen.id, p.rejected.id) for p in pairs] == [
        ("p00001-c07", "p00001-c00"), ("p00002-c02", "p00002-c00")]
    assert pairs[0].inferred  # a Swiss schedule of 8 never shows the best beside the worst
    assert (counts.pairs, counts.ties, counts.skips, counts.inferred) == (2, 2, 1, 1)
    assert counts.labels == 1 + 12 + 3 + 1

    pairs, counts = pairs_from_labels(tmp_path, "all")
    assert len(pairs) == 12 + 3 and all(p.chosen.id > p.rejected.id for p in pairs)
    assert (counts.ties, counts.skips) == (1, 1)
    with pytest.raises(ValueError, match="strategy"):
        pairs_from_labels(tmp_path, "random")


def test_unfinished_prompts_are_counted_and_undone_labels_ignored(tmp_path):
    write_candidates(tmp_path, [6, 2])
    labels = _label(tmp_path, redder)
    log = LabelLog(tmp_path)
    log.add_undo(labels[0].id)  # prompt 0's first pair is due again: that prompt is unfinished
    log.close()
    pairs, counts = pairs_from_labels(tmp_path, "best_worst")
    assert [(p.chosen.id, p.rejected.id) for p in pairs] == [("p00001-c01", "p00001-c00")]
    assert (counts.unfinished, counts.labels) == (1, len(labels) - 1)
    pairs, _ = pairs_from_labels(tmp_path, "all")
    assert pair_key(labels[0].left, labels[0].right) not in {
        pair_key(p.chosen.id, p.rejected.id) for p in pairs}


def test_make_from_labels_writes_a_manifest_the_trainer_reads(tmp_path):
    folder = tmp_path / "cands"
    write_candidates(folder, [3, 3])
    _label(folder, redder)
    out = tmp_path / "pairs.jsonl"
    assert sipo_pairs(["make", "--candidates", str(folder), "--from-labels",
                       "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["chosen_id"], r["rejected_id"], r["source"]) for r in rows] == [
        ("p00000-c02", "p00000-c00", "label"), ("p00001-c02", "p00001-c00", "label")]
    assert rows[0]["chosen_latents"] == "cands/latents/p00000-c02.safetensors"
    pairs = read_pairs(out)
    assert [p.chosen.name for p in pairs] == ["p00000-c02.png", "p00001-c02.png"]


def test_labels_win_over_reward_scores(tmp_path, capsys):
    folder = tmp_path / "cands"
    write_candidates(folder, [3, 3, 3])
    score_candidates(folder, [build_reward("test_label_export:blueness", device="cpu")],
                     progress=False)
    _label(folder, redder, stop=2)  # prompts 0 and 1 labelled, prompt 2 left to the reward
    out = tmp_path / "pairs.jsonl"
    assert sipo_pairs(["make", "--candidates", str(folder), "--from-labels",
                       "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["chosen_id"], r["rejected_id"], r["source"]) for r in rows] == [
        ("p00000-c02", "p00000-c00", "label"), ("p00001-c02", "p00001-c00", "label"),
        ("p00002-c00", "p00002-c02", "reward")]
    assert rows[0]["margin"] < 0 < rows[2]["margin"]  # the reward disagrees with the labels
    assert "the rewards agree with 0 of 2 labelled pairs" in capsys.readouterr().out


def test_no_labels_is_one_line(tmp_path, capsys):
    write_candidates(tmp_path, [2])
    assert sipo_pairs(["make", "--candidates", str(tmp_path), "--from-labels",
                       "--out", str(tmp_path / "p.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sipo-pairs label --candidates" in err
