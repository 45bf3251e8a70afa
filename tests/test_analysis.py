"""The per-timestep analysis: statistics hand-checked on small tensors; the command end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from sipo_plugin.analysis.stats import (
    bucket_bounds,
    bucket_index,
    distribution,
    masked_fraction,
    pair_gradient_norm,
    per_bucket,
    stratified_timesteps,
)

ROOT = Path(__file__).resolve().parents[1]


def test_bucket_bounds_cover_the_schedule_exactly():
    assert bucket_bounds(1000, 10)[0] == (0, 99) and bucket_bounds(1000, 10)[-1] == (900, 999)
    bounds = bucket_bounds(10, 3)  # floor(t * 3 / 10): 0-3 -> 0, 4-6 -> 1, 7-9 -> 2
    assert bounds == [(0, 3), (4, 6), (7, 9)]
    t = torch.arange(10)
    for b, (lo, hi) in enumerate(bounds):
        assert bucket_index(t, 10, 3)[lo: hi + 1].tolist() == [b] * (hi - lo + 1)
    with pytest.raises(ValueError, match="n_buckets"):
        bucket_bounds(5, 6)


def test_bucket_index_hand_values_and_flow_endpoint():
    t = torch.tensor([0, 99, 100, 555, 999])
    assert bucket_index(t, 1000, 10).tolist() == [0, 0, 1, 5, 9]
    # flow timesteps are floats in [0, N]; t = N (sigma = 1) belongs to the last bucket
    assert bucket_index(torch.tensor([0.0, 99.99, 1000.0]), 1000, 10).tolist() == [0, 0, 9]


def test_stratified_timesteps_stay_in_their_bucket():
    g = torch.Generator().manual_seed(0)
    for b in range(10):
        t = stratified_timesteps(b, 50, 1000, 10, g)
        assert t.dtype == torch.long and bool((bucket_index(t, 1000, 10) == b).all())
        f = stratified_timesteps(b, 50, 1000, 10, g, integer=False)
        assert f.is_floating_point() and bool((bucket_index(f, 1000, 10) == b).all())
    one = stratified_timesteps(0, 200, 10, 10, g)  # bucket 0 of 10 timesteps holds only t = 0
    assert one.unique().tolist() == [0]
    with pytest.raises(ValueError, match="bucket"):
        stratified_timesteps(10, 1, 1000, 10, g)


def test_distribution_hand_values():
    d = distribution(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert d["mean"] == 3.0 and d["min"] == 1.0 and d["max"] == 5.0
    assert d["std"] == pytest.approx(math.sqrt(2.0))  # population std
    assert d["q50"] == 3.0 and d["q25"] == 2.0 and d["q75"] == 4.0
    assert d["q05"] == pytest.approx(1.2) and d["q95"] == pytest.approx(4.8)
    assert all(math.isnan(v) for v in distribution(torch.tensor([])).values())


def test_masked_fraction_counts_pairs_with_either_weight_below_tau():
    w_w = torch.tensor([0.95, 0.5, 0.95, 0.2])
    w_l = torch.tensor([0.95, 0.95, 0.89, 0.1])
    assert masked_fraction(w_w, w_l, 0.9) == pytest.approx(0.75)
    assert masked_fraction(w_w, w_l, 0.05) == 0.0
    assert math.isnan(masked_fraction(torch.tensor([]), torch.tensor([]), 0.9))


def test_pair_gradient_norm_matches_autograd():
    torch.manual_seed(0)
    theta = torch.randn(5, requires_grad=True)
    x_w, x_l = torch.randn(5), torch.randn(5)
    m_w, m_l = (theta * x_w).square().sum(), (theta * x_l).tanh().sum()
    g_w, = torch.autograd.grad(m_w, theta, retain_graph=True)
    g_l, = torch.autograd.grad(m_l, theta, retain_graph=True)
    a, b = 0.7, -1.3  # dL/dm_w, dL/dm_l
    expected = torch.autograd.grad(a * m_w + b * m_l, theta)[0].norm()
    got = pair_gradient_norm(torch.tensor([a]), torch.tensor([b]), g_w.dot(g_w)[None],
                             g_l.dot(g_l)[None], g_w.dot(g_l)[None])
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_per_bucket_groups_values():
    stats = per_bucket(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([0, 0, 2]), 3)
    assert stats[0]["mean"] == 2.0 and math.isnan(stats[1]["mean"]) and stats[2]["max"] == 10.0
    with pytest.raises(ValueError, match="differ"):
        per_bucket(torch.zeros(2), torch.zeros(3), 2)


@pytest.mark.slow
def test_analyze_command_on_the_toy_model(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_training import make_rendered_pairs

    import train_sipo

    manifest = make_rendered_pairs(tmp_path / "pairs", n_pairs=8)
    out = tmp_path / "run"
    code = train_sipo.main([
        "--preset", str(ROOT / "presets" / "demo.toml"), "--analyze", "--analysis-pairs", "4",
        "--analysis-buckets", "3", "--analysis-grad-pairs", "2", "--pairs_prompts", '""',
        "--train_data", str(manifest), "--output_dir", str(out), "--train_batch_size", "2",
        "--calibration_pairs", "4", "--eval_after_training", "false"])
    assert code == 0
    folder = out / "analysis"
    summary = json.loads((folder / "analysis.json").read_text())
    assert summary["buckets"] == [[0, 333], [334, 666], [667, 999]]
    assert summary["pairs_per_bucket"] == [4, 4, 4]
    assert summary["grad_pairs_per_bucket"] == [2, 2, 2]
    kappa = summary["settings"]["kappa"]
    assert isinstance(kappa, float) and kappa > 0
    # a fresh LoRA is an exact no-op: the reference weight model gives w = 1, masks nothing
    ref = summary["importance_weights"]["reference"]
    assert all(s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(1.0) for s in ref)
    assert summary["masked_fraction"]["reference_overall"] == 0.0
    step = summary["importance_weights"]["step"]
    assert all(0.0 <= s["min"] <= s["max"] <= 1.0 for s in step)
    assert step[0]["q50"] <= step[-1]["q50"]  # low weights sit at the least noisy steps
    assert set(summary["grad_norm"]) >= {"sft", "diffusion-dpo", "dpo-cm", "sipo"}
    for stats in summary["grad_norm"].values():
        assert all(s["mean"] >= 0 and math.isfinite(s["mean"]) for s in stats)
    for name in ("weights_by_timestep.png", "masked_fraction.png", "grad_norm_by_timestep.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _family_overrides(family: str, tmp_path: Path) -> list[str]:
    """A tiny model of the family saved in the diffusers layout, and its pair data."""
    sys.path.insert(0, str(ROOT / "tests"))
    if family == "wan":
        from tiny_video import write_video_pairs
        from tiny_wan import save_tiny_wan
        return ["--family", "wan", "--pretrained_model_name_or_path",
                str(save_tiny_wan(tmp_path / "wan")), "--train_data",
                str(write_video_pairs(tmp_path / "clips", num_pairs=2, num_frames=5, height=32,
                                      width=32)),
                "--num_frames", "5", "--video_height", "32", "--video_width", "32",
                "--lora_format", "wan", "--train_batch_size", "1", "--network_dim", "4"]
    if family == "cogvideox":
        from tiny_video import save_tiny_cogvideox, write_video_pairs
        return ["--family", "cogvideox", "--pretrained_model_name_or_path",
                str(save_tiny_cogvideox(tmp_path / "cog")), "--train_data",
                str(write_video_pairs(tmp_path / "clips", num_pairs=2, num_frames=5, height=16,
                                      width=32)),
                "--num_frames", "5", "--frame_fps", "8", "--video_height", "16",
                "--video_width", "32", "--lora_format", "diffusers", "--train_batch_size", "1",
                "--network_dim", "4"]
    from test_training import make_rendered_pairs
    pairs = ["--train_data", str(make_rendered_pairs(tmp_path / "pairs", n_pairs=2)),
             "--resolution", "32", "--train_batch_size", "2"]
    if family == "sdxl":  # with a text-encoder LoRA: its gradient flows through the prompts
        from tiny_sdxl import save_tiny_sdxl
        return ["--family", "sdxl", "--pretrained_model_name_or_path",
                str(save_tiny_sdxl(tmp_path / "sdxl")), "--train_text_encoder", "true", *pairs]
    return ["--finetune", "full", *pairs]  # the toy model, every U-Net weight trained


@pytest.mark.slow
@pytest.mark.parametrize("family", ["wan", "cogvideox", "sdxl", "sd15-full"])
def test_analysis_runs_on_every_family(family, tmp_path):
    from sipo_plugin.analysis import run_analysis
    from sipo_plugin.training.config import load_config

    config = load_config(None, [*_family_overrides(family, tmp_path), "--objective", "sipo",
                                "--output_dir", str(tmp_path / "out"),
                                "--calibration_pairs", "4"])
    summary = run_analysis(config, n_pairs=2, n_buckets=2, grad_pairs=1)
    assert summary["pairs_per_bucket"] == [2, 2] and summary["grad_pairs_per_bucket"] == [1, 1]
    lo, hi = summary["timestep_range_seen"]
    assert 0 <= lo < 500 <= hi <= 1000  # one draw in each half of the schedule
    for name in ("sft", "diffusion-dpo"):
        assert all(math.isfinite(s["mean"]) and s["mean"] > 0 for s in summary["grad_norm"][name])
    # a masked pair (sft_weight 0) contributes exactly no gradient
    masked = summary["masked_fraction"]["step"]
    for share, s in zip(masked, summary["grad_norm"]["sipo"], strict=True):
        assert (s["max"] == 0.0) if share == 1.0 else (s["mean"] > 0 or share > 0)
    assert (tmp_path / "out" / "analysis" / "grad_norm_by_timestep.png").is_file()


@pytest.mark.slow
def test_analysis_of_a_checkpoint_uses_its_lora_and_kappa(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_training import make_rendered_pairs

    from sipo_plugin.analysis import run_analysis
    from sipo_plugin.training.config import load_config
    from sipo_plugin.training.loop import train

    overrides = ["--train_data", str(make_rendered_pairs(tmp_path / "pairs", n_pairs=4)),
                 "--output_dir", str(tmp_path / "run"), "--resolution", "32",
                 "--train_batch_size", "2", "--objective", "sipo", "--kappa", "50.0",
                 "--weight_model", '"reference"', "--learning_rate", "1e-2"]
    train(load_config(None, [*overrides, "--max_train_steps", "3", "--save_every_n_steps", "3"]))
    summary = run_analysis(load_config(None, [*overrides, "--resume", "latest"]),
                           n_pairs=2, n_buckets=2, grad_pairs=1)
    assert summary["settings"]["kappa"] == 50.0
    assert summary["settings"]["kappa_source"] == "from the checkpoint"
    # a trained LoRA differs from the reference: the reference weight model moves off 1
    ref = summary["importance_weights"]["reference"]
    assert any(abs(s["min"] - 1.0) > 1e-6 or abs(s["max"] - 1.0) > 1e-6 for s in ref)
