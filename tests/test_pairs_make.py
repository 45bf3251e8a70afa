"""sipo-pairs make: strategies, margins, equal images and ties dropped and counted; the manifest is
read by the trainer's reader as it is; a margin histogram is written."""

import json

import pytest
from PIL import Image

from sipo_plugin.data.pairs import read_pairs
from sipo_plugin.pairs.candidates import Candidate, candidate_id
from sipo_plugin.pairs.cli import main
from sipo_plugin.pairs.make import make_manifest, make_pairs, parse_weights
from sipo_plugin.pairs.score import ScoresError, score_candidates
from sipo_plugin.rewards import build_reward
from test_pairs_score import REDS, write_candidates


def _candidates(sizes):
    return [Candidate(id=candidate_id(p, c), prompt=f"p{p}", prompt_index=p, candidate_index=c,
                      seed=0, path=f"images/{candidate_id(p, c)}.png")
            for p, k in enumerate(sizes) for c in range(k)]


def test_best_worst_and_all_by_hand():
    cands = _candidates([3, 3, 2])
    combined = [0.0, 2.0, 1.0,   5.0, 5.0, 5.0,   1.0, 0.5]
    identity = ["a", "b", "c",   "d", "e", "f",   "g", "g"]  # prompt 2: one image twice
    pairs, counts = make_pairs(cands, combined, identity, strategy="best_worst")
    assert [(p.chosen.id, p.rejected.id, p.margin) for p in pairs] == [
        ("p00000-c01", "p00000-c00", 2.0)]
    assert (counts.prompts, counts.ties, counts.equal_images, counts.single) == (3, 1, 1, 1)
    pairs, counts = make_pairs(cands, combined, identity, strategy="all", min_margin=1.0)
    # prompt 0: (c1 > c0, 2.0) kept, (c2 > c0, 1.0) kept (margin clears 1.0), (c1 > c2, 1.0) kept
    # prompt 1: three ties; prompt 2: equal images
    assert sorted((p.chosen.id[-3:], p.rejected.id[-3:], p.margin) for p in pairs) == [
        ("c01", "c00", 2.0), ("c01", "c02", 1.0), ("c02", "c00", 1.0)]
    assert (counts.pairs, counts.ties, counts.below_margin, counts.equal_images) == (3, 3, 0, 1)
    _, counts = make_pairs(cands, combined, identity, strategy="all", min_margin=1.5)
    assert (counts.pairs, counts.below_margin) == (1, 2)
    assert sorted(counts.considered_margins) == [0.0, 0.0, 0.0, 1.0, 1.0, 2.0]


def test_weights_parse_and_bad_strategy():
    assert parse_weights(["pickscore=1", "a=b=0.5"]) == {"pickscore": 1.0, "a=b": 0.5}
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        parse_weights(["pickscore"])
    with pytest.raises(ValueError, match="strategy"):
        make_pairs([], [], [], strategy="random")


@pytest.fixture
def scored(tmp_path):
    reds = [row[:] for row in REDS]
    reds[2][3] = reds[2][2]  # prompt 2: candidates 2 and 3 are the same image
    folder = write_candidates(tmp_path / "cands", reds, latents=True)
    score_candidates(folder, [build_reward("test_pairs_score:red", device="cpu"),
                              build_reward("test_pairs_score:green", device="cpu")],
                     progress=False)
    return folder


def test_manifest_is_read_by_the_trainer_and_carries_scores_and_latents(scored, tmp_path):
    out = tmp_path / "pairs" / "pairs.jsonl"
    counts = make_manifest(scored, out, strategy="best_worst")
    assert (counts.pairs, counts.equal_images) == (3, 1)
    records = read_pairs(out)
    assert [(r.chosen.name, r.rejected.name) for r in records] == [
        ("p00000-c03.png", "p00000-c00.png"), ("p00001-c00.png", "p00001-c02.png"),
        ("p00002-c02.png", "p00002-c00.png")]
    assert records[0].prompt == "a cat number 0" and records[0].chosen.is_file()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["chosen_id"] == "p00000-c03" and rows[0]["rejected_id"] == "p00000-c00"
    assert rows[0]["chosen_scores"]["test_pairs_score:red"] == pytest.approx(153 / 255)
    assert (out.parent / rows[0]["chosen_latents"]).resolve() == (
        scored / "latents/p00000-c03.safetensors").resolve()
    # green is constant: z = 0, so the margin is red's z-score difference over all 12 candidates
    import numpy as np
    red = np.array([v for row in REDS for v in row], float)
    red[11] = red[10]
    z = (red - red.mean()) / red.std()
    assert rows[0]["margin"] == pytest.approx(z[3] - z[0], abs=1e-5)
    png = out.with_name("pairs.margins.png")
    assert Image.open(png).format == "PNG"


def test_all_with_min_margin_and_weights_on_the_command_line(scored, tmp_path, capsys):
    out = tmp_path / "all.jsonl"
    assert main(["make", "--candidates", str(scored), "--out", str(out), "--strategy", "all",
                 "--min_margin", "0.5", "--reward_weight", "test_pairs_score:red=2"]) == 0
    summary = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["margin"] >= 0.5 for r in rows) and len(rows) == len(read_pairs(out))
    assert "1 equal images" in summary and f"{len(rows)} pairs" in summary
    assert main(["make", "--candidates", str(scored), "--out", str(out),
                 "--reward_weight", "pickscore=1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no pickscore score" in err


def test_unscored_candidates_and_impossible_margins_say_what_to_do(tmp_path):
    folder = write_candidates(tmp_path / "c", [[1, 2]])
    with pytest.raises(ScoresError, match="no scores; run `sipo-pairs score"):
        make_manifest(folder, tmp_path / "p.jsonl")
    score_candidates(folder, [build_reward("test_pairs_score:red", device="cpu")], progress=False)
    from sipo_plugin.data.errors import PairDataError
    with pytest.raises(PairDataError, match="no pairs .*lower --min_margin"):
        make_manifest(folder, tmp_path / "p.jsonl", min_margin=100.0)
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.slow
def test_score_and_make_benchmark_runs(tmp_path, capsys):
    """benchmarks/score_and_make.py on a few candidates (it must keep working; no timing asserted)."""
    import runpy
    from pathlib import Path
    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks/score_and_make.py"))
    rows = bench["bench_scoring"](tmp_path, "tiny", 4, [1, 4])
    assert [r["batch_size"] for r in rows] == [1, 4] and all(r["cand_per_s"] > 0 for r in rows)
    rows = bench["bench_make"](tmp_path, 40)
    assert [r["pairs"] for r in rows if "pairs" in r] == [10, 60]  # 10 prompts x (1, C(4, 2))
