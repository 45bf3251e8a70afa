"""Evaluation of any model: paired statistics, held-out prompts, eval.json per reward, the grid,
the reward curve (step 0 = the base), --evaluate of an exported LoRA, and the [toy] migration."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sipo_plugin.data.pairs import PairRecord
from sipo_plugin.evaluation import paired_stats, split_holdout
from sipo_plugin.training.config import ConfigError, load_config
from test_training import short_run

ROOT = Path(__file__).resolve().parents[1]


def test_paired_stats_by_hand():
    stats = paired_stats(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 5.0]))
    # d = (1, 0, 2): mean 1, sample std 1, SE 1/sqrt(3); wins 1, 0.5 (tie), 1
    assert stats["reward_gain"] == pytest.approx(1.0)
    assert stats["reward_se"] == pytest.approx(1 / math.sqrt(3))
    assert stats["win_rate"] == pytest.approx(2.5 / 3)
    assert (stats["base_reward"], stats["tuned_reward"], stats["n_samples"]) == (2.0, 3.0, 3)
    with pytest.raises(ValueError, match="equal non-empty"):
        paired_stats(torch.zeros(2), torch.zeros(3))


def test_holdout_is_a_deterministic_disjoint_share_of_the_prompts():
    records = [PairRecord(f"prompt {i % 10}", "w.png", "l.png") for i in range(40)]
    train, held = split_holdout(records, 0.2, seed=3)
    assert len(held) == 2 and not {r.prompt for r in train} & set(held)
    assert len(train) == 32  # 4 pairs per prompt, 2 prompts out
    assert split_holdout(list(reversed(records)), 0.2, seed=3)[1] == held  # order-free
    assert split_holdout(records, 0.0, seed=3) == (records, [])


def _evaluated_run(manifest, out, *extra):
    from sipo_plugin.training.run import run
    config = short_run(manifest, out, "--max_train_steps", "4", "--eval_after_training", "true",
                       "--eval_prompts", "toy", "--eval_samples", "6", "--eval_curve_samples", "6",
                       "--eval_rewards", '["colour", "geometry"]', "--evaluate_every_n_steps", "2",
                       "--sampler_steps", "4", "--guidance_scale", "3.0",
                       "--sample_every_n_steps", "4", "--sample_prompts", '["a red circle on a '
                       'gray background"]', "--sample_steps", "2", *extra)
    return config, run(config)


@pytest.mark.slow
def test_eval_json_grid_curve_and_the_standalone_evaluate(manifest, tmp_path):
    config, summary = _evaluated_run(manifest, tmp_path / "run")
    out = tmp_path / "run"
    stats = json.loads((out / "eval.json").read_text())
    assert stats == summary["eval"]
    assert set(stats["rewards"]) == {"colour", "geometry"} and stats["reward"] == "colour"
    for s in stats["rewards"].values():
        assert s["n_samples"] == 6 and 0 <= s["win_rate"] <= 1
        assert s["reward_gain"] == pytest.approx(s["tuned_reward"] - s["base_reward"])
    assert 0 <= stats["base_fidelity"] <= 1  # the toy model: fidelity too
    grid = Image.open(out / "samples_before_after.png")
    assert grid.size == (48 + 6 * 128, 2 * 128 + 48)  # label column, 6 columns, two rows + text
    # the reward curve: step 0 is the base model, the last point the tuned one, on the same seeds
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    points = {row["step"]: row for row in curve if row.get("event") == "eval"}
    assert sorted(points) == [0, 2, 4]
    assert points[0]["eval/colour"] == pytest.approx(stats["rewards"]["colour"]["base_reward"], abs=1e-6)
    assert points[4]["eval/colour"] == pytest.approx(stats["rewards"]["colour"]["tuned_reward"], abs=1e-6)
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == ["sipo_lora_000000_00.png", "sipo_lora_000004_00.png"]  # step 0: the base
    # --evaluate: the exported LoRA loaded into the base pipeline gives the same evaluation
    preset = tmp_path / "p.toml"
    preset.write_text(f'[data]\ntrain_data = "{manifest}"\nresolution = 32\n'
                      f'[training]\noutput_dir = "{out}"\n[sampling]\nsampler_steps = 4\n'
                      'guidance_scale = 3.0\n[evaluate]\neval_prompts = "toy"\neval_samples = 6\n'
                      f'eval_rewards = ["colour", "geometry"]\n')
    (out / "eval.json").unlink()
    done = subprocess.run([sys.executable, str(ROOT / "train_sipo.py"), "--preset", str(preset),
                           "--evaluate"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    again = json.loads((out / "eval.json").read_text())
    for name in ("colour", "geometry"):
        for key in ("base_reward", "tuned_reward"):
            assert again["rewards"][name][key] == pytest.approx(stats["rewards"][name][key], abs=2e-3)


def test_evaluate_without_a_lora_and_old_toy_presets_are_one_line(manifest, tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text(f'[data]\ntrain_data = "{manifest}"\n[training]\noutput_dir = "{tmp_path}"\n'
                      '[evaluate]\neval_rewards = ["colour"]\n')
    done = subprocess.run([sys.executable, str(ROOT / "train_sipo.py"), "--preset", str(preset),
                           "--evaluate"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert "LoRA not found" in done.stderr
    old = tmp_path / "old.toml"
    old.write_text(f'[data]\ntrain_data = "{manifest}"\n[toy]\ngenerate_pairs = true\n')
    with pytest.raises(ConfigError, match=r"old.toml: the \[toy\] section is gone.*\[pairs\]"):
        load_config(old)


def test_config_checks_of_pairs_and_evaluation(manifest, tmp_path):
    with pytest.raises(ConfigError, match="needs 'rewards'"):
        short_run(manifest, tmp_path, "--pairs_prompts", "toy")
    with pytest.raises(ConfigError, match="sampler 'euler_b' is not available for sd15"):
        short_run(manifest, tmp_path, "--sampler", "euler_b")
    with pytest.raises(ConfigError, match="evaluation needs rewards"):
        short_run(manifest, tmp_path, "--eval_after_training", "true")
    with pytest.raises(ConfigError, match="eval_prompts = 'nope.txt': prompt file not found"):
        short_run(manifest, tmp_path, "--eval_prompts", "nope.txt")
