"""Video pair data (PyAV clips, frame folders) and the CogVideoX adapter on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_sipo
from sipo_plugin.data import Draw, PairDataError, collate_pairs, read_pairs
from sipo_plugin.data.video import (VideoPairDataset, check_num_frames, load_video, save_clip,
                                    select_frames)
from sipo_plugin.models.cogvideox import CogVideoXAdapter, rotary_embeddings
from sipo_plugin.objectives import get_objective
from sipo_plugin.objectives.errors import PairErrors
from sipo_plugin.objectives.importance import importance_weights
from sipo_plugin.objectives.schedule import parametrization, schedule_error_factor, snr
from sipo_plugin.training.config import ConfigError, load_config
from sipo_plugin.training.loop import train
from sipo_plugin.training.run import run
from tiny_video import save_tiny_cogvideox, write_video, write_video_pairs

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["presets/cogvideox_2b_lora_sipo.toml", "presets/cogvideox_5b_lora_sipo.toml"]
OBJECTIVES = ["diffusion-dpo", "dpo-cm", "sipo", "sft"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_cogvideox(tmp_path_factory.mktemp("tiny_cogvideox") / "model")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_video_pairs(tmp_path_factory.mktemp("video_pairs"), num_pairs=3)


def model_cfg(path: Path, **overrides) -> SimpleNamespace:
    values = dict(pretrained_model_name_or_path=str(path), base_weights_dtype="",
                  group_offload=False, vae_tiling=False, vae_slicing=False)
    return SimpleNamespace(**{**values, **overrides})


def counting_clip(num_frames: int) -> np.ndarray:
    """[F, 16, 16, 3]: frame i is uniformly 8 * i, so a decoded frame tells its index."""
    return np.stack([np.full((16, 16, 3), 8 * i, np.uint8) for i in range(num_frames)])


def frame_indices(clip: torch.Tensor) -> list[int]:
    """[3, F, H, W] in [-1, 1] made from `counting_clip` -> the source index of every frame."""
    values = (clip + 1) * 127.5  # [3, F, H, W] in [0, 255]
    return [round(float(v) / 8) for v in values.mean(dim=(0, 2, 3))]


# ---------------------------------------------------------------------------------------------
# Frame sampling


def test_num_frames_must_be_4k_plus_1():
    assert check_num_frames(49) == 49 and check_num_frames(1) == 1
    with pytest.raises(ValueError, match=r"4k\+1 \(e\.g\. 45 or 49\), got 48"):
        check_num_frames(48)
    with pytest.raises(ValueError, match=r"4k\+1"):
        VideoPairDataset([], num_frames=8, frame_fps=0, height=16, width=16)


def test_select_frames_follows_timestamps():
    at_24fps = [(i / 24, i) for i in range(30)]
    # down-sampling 24 -> 8 fps: every third frame, t_j = j / 8
    assert select_frames(iter(at_24fps), 9, 8)[0] == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    # between frames, the one on screen: 24 -> 10 fps, t_j = j / 10 -> floor(2.4 j)
    assert select_frames(iter(at_24fps), 5, 10)[0] == [0, 2, 4, 7, 9]
    # up-sampling 8 -> 16 fps repeats frames; the last one counts up to its own timestamp
    at_8fps = [(0.5 + i / 8, i) for i in range(5)]  # timestamps need not start at 0
    assert select_frames(iter(at_8fps), 9, 16)[0] == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert select_frames(iter(at_8fps), 9, 16)[1] == pytest.approx(0.5)  # the span, not 1.0
    # fps = 0: the first frames as they are
    assert select_frames(iter(at_24fps), 5, 0)[0] == [0, 1, 2, 3, 4]
    # too short: 13 frames at 8 fps need 1.5 s, the stream ends at 29 / 24 s
    picked, last = select_frames(iter(at_24fps), 13, 8)
    assert len(picked) == 10 and last == pytest.approx(29 / 24)


def test_decoded_clip_is_resampled_by_timestamps(tmp_path):
    path = write_video(tmp_path / "count.mp4", counting_clip(30), fps=24)
    clip = load_video(path, num_frames=9, frame_fps=8, height=16, width=16)
    assert clip.shape == (3, 9, 16, 16) and clip.dtype == torch.float32
    assert frame_indices(clip) == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    native = load_video(path, num_frames=5, frame_fps=0, height=16, width=16)
    assert frame_indices(native) == [0, 1, 2, 3, 4]


def test_short_clip_names_the_file_and_the_fix(tmp_path):
    path = write_video(tmp_path / "short.mp4", counting_clip(10), fps=24)
    with pytest.raises(PairDataError) as err:
        load_video(path, num_frames=13, frame_fps=8, height=16, width=16)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "clip too short" in message
    assert "lower num_frames or frame_fps" in message


def test_undecodable_video_is_a_one_line_pair_error(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"not a video at all" * 10)
    with pytest.raises(PairDataError, match="cannot decode video") as err:
        load_video(path, num_frames=5, frame_fps=0, height=16, width=16)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_frame_folder_is_read_in_name_order(tmp_path):
    frames = counting_clip(6)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, name in enumerate(["b", "d", "a", "f", "c", "e"]):  # written out of order
        Image.fromarray(frames[i]).save(folder / f"{name}.png")
    clip = load_video(folder, num_frames=5, frame_fps=8, height=16, width=16)
    # sorted names a, b, c, d, e hold frames 2, 0, 4, 1, 5
    assert frame_indices(clip) == [2, 0, 4, 1, 5]
    with pytest.raises(PairDataError, match="frame folder has 6 frames"):
        load_video(folder, num_frames=9, frame_fps=0, height=16, width=16)


def test_video_manifest_gives_winner_first_clip_batches(manifest):
    records = read_pairs(manifest)  # frame folders pass the manifest's path check
    assert [r.chosen.name for r in records] == ["w0.mp4", "w1.mp4", "w2.mp4", "w_frames"]
    dataset = VideoPairDataset(records, num_frames=5, frame_fps=8, height=16, width=32)
    items = [dataset[Draw(i, 0)] for i in (0, 3)]
    batch = collate_pairs(items)
    assert batch.pixel_values.shape == (4, 3, 5, 16, 32)
    assert torch.equal(batch.pixel_values[1], items[1]["chosen"])
    assert torch.equal(batch.pixel_values[3], items[1]["rejected"])
    assert batch.pixel_values.min() >= -1 and batch.pixel_values.max() <= 1
    assert batch.weights.tolist() == [1.0, 2.0]
    # the winner's square is red, the loser's blue (R - B over the clip)
    chosen, rejected = items[0]["chosen"], items[0]["rejected"]
    assert (chosen[0] - chosen[2]).max() > 1.0 and (rejected[0] - rejected[2]).min() < -1.0
    assert (chosen[0] - chosen[2]).min() > -0.2 and (rejected[0] - rejected[2]).max() < 0.2


def test_missing_pyav_is_one_line_with_the_install_hint(tmp_path, monkeypatch):
    path = write_video(tmp_path / "a.mp4", counting_clip(5), fps=8)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"pip install 'sipo-plugin\[video\]'"):
        load_video(path, num_frames=5, frame_fps=0, height=16, width=16)


def test_save_clip_writes_a_looping_gif(tmp_path):
    clip = torch.linspace(-1, 1, 5).view(1, 5, 1, 1).expand(3, 5, 8, 12)  # [3, F, H, W]
    path = save_clip(clip, tmp_path / "clip.gif", fps=8)
    with Image.open(path) as gif:
        assert gif.n_frames == 5 and gif.size == (12, 8)
        gif.seek(4)
        assert np.asarray(gif.convert("RGB")).mean() == pytest.approx(255, abs=1)


# ---------------------------------------------------------------------------------------------
# Config


def video_overrides(model_dir: Path, manifest: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--family", "cogvideox", "--pretrained_model_name_or_path", str(model_dir),
            "--train_data", str(manifest), "--num_frames", "5", "--frame_fps", "8",
            "--video_height", "16", "--video_width", "32", "--lora_format", "diffusers",
            "--output_dir", str(output_dir), "--max_train_steps", "2", "--train_batch_size", "2",
            "--learning_rate", "1e-3", "--calibration_pairs", "2", "--logging_steps", "1",
            "--network_dim", "4", "--network_alpha", "2", *extra]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_pass_check(preset, model_dir, manifest, capsys):
    args = ["--preset", str(ROOT / preset), "--check", "--pretrained_model_name_or_path",
            str(model_dir), "--train_data", str(manifest)]
    assert train_sipo.main(args) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["model"]["family"] == "cogvideox" and resolved["data"]["num_frames"] == 49
    assert (resolved["data"]["video_height"], resolved["data"]["video_width"]) == (480, 720)


@pytest.mark.parametrize("bad, message", [
    (["--num_frames", "48"], r"num_frames must be 4k\+1"),
    (["--video_height", "200"], "video_height must be a positive multiple of 16 for cogvideox"),
    (["--lora_format", "kohya"], "lora_format"),
    (["--base_weights_dtype", "fp4"], "base_weights_dtype must be one of"),
    (["--train_text_encoder", "true"], "train_text_encoder is not supported for CogVideoX"),
])
def test_bad_video_settings_are_one_line_config_errors(bad, message, model_dir, manifest, tmp_path):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, video_overrides(model_dir, manifest, tmp_path, *bad))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Adapter


def test_scheduler_is_v_prediction_with_zero_terminal_snr_and_finite_weights(model_dir):
    adapter = CogVideoXAdapter.load(model_cfg(model_dir), device=CPU)
    scheduler = adapter.noise_scheduler
    assert adapter.prediction_type == "v_prediction" == parametrization(scheduler)
    t = torch.tensor([0, 1, 500, 998, 999])
    assert snr(t, scheduler)[-1] == 0 and torch.all(snr(t, scheduler)[:-1] > 0)
    a_t = schedule_error_factor(t, scheduler)
    assert torch.isinf(a_t[0]) and torch.all(torch.isfinite(a_t[1:])) and a_t[-1] > 0
    err = torch.full((5,), 0.3)
    w_w, w_l = importance_weights(PairErrors(err, err * 2, err, err, t, scheduler),
                                  weight_model="step", kappa=1.0)
    assert w_w[0] == 0 and w_l[0] == 0  # t = 0: masked
    assert torch.all(torch.isfinite(w_w)) and torch.all(w_w[1:] > 0)
    # every objective gives a finite loss at t = 0 and at the zero-SNR step
    gen = torch.Generator().manual_seed(0)
    pred, ref, target = (torch.randn(4, 2, 4, 2, 2, generator=gen) for _ in range(3))
    timesteps = torch.tensor([0, 999, 0, 999])
    for name in OBJECTIVES:
        hp = {"kappa": 1.0} if name in ("dpo-cm", "sipo") else {}
        out = get_objective(name, **hp)(pred, ref, target, timesteps, scheduler)
        assert torch.isfinite(out.loss) and torch.all(torch.isfinite(out.per_pair_loss)), name


def test_latents_noise_target_and_rope(model_dir):
    adapter = CogVideoXAdapter.load(model_cfg(model_dir), device=CPU)
    pixels = torch.rand(4, 3, 9, 16, 32) * 2 - 1
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    latents = adapter.encode_images(pixels, gens)
    assert latents.shape == (4, 3, 4, 2, 4)  # [N, 1 + 8/4 frames, C, 16/8, 32/8]
    dist = adapter.vae.encode(pixels).latent_dist
    again = dist.sample([torch.Generator().manual_seed(i) for i in range(4)])
    expected = (again * adapter.vae.config.scaling_factor).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(latents, expected)
    # one noise and one timestep per pair, shared by winner and loser
    noisy = adapter.noisy_inputs(latents, [torch.Generator().manual_seed(9 + i) for i in range(2)])
    assert torch.equal(noisy.timesteps[:2], noisy.timesteps[2:])
    abar = adapter.noise_scheduler.alphas_cumprod[noisy.timesteps].float().view(-1, 1, 1, 1, 1)
    noise = (noisy.noisy - abar.sqrt() * latents) / (1 - abar).sqrt()
    torch.testing.assert_close(noise[:2], noise[2:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(noisy.target, abar.sqrt() * noise - (1 - abar).sqrt() * latents,
                               atol=1e-4, rtol=1e-4)
    # RoPE as CogVideoXPipeline computes it for this pixel size
    pipe_rope = adapter.sampling_pipeline()._prepare_rotary_positional_embeddings(16, 32, 3, CPU)
    ours = rotary_embeddings(adapter.transformer.config, 3, 2, 4, CPU)
    assert all(torch.equal(a, b) for a, b in zip(ours, pipe_rope))
    with pytest.raises(ValueError, match="4k\\+1 frames and sizes divisible by 16"):
        adapter.encode_images(torch.zeros(2, 3, 8, 16, 32), gens[:2])


def test_cogvideox_1_5_temporal_patches():
    """patch_size_t = 2 (CogVideoX 1.5): an even latent frame count trains, an odd one is refused
    with the nearest valid num_frames."""
    from tiny_video import tiny_cogvideox_components
    adapter = CogVideoXAdapter(tiny_cogvideox_components(0, patch_size_t=2), device=CPU,
                               weight_dtype=torch.float32)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    latents = adapter.encode_images(torch.zeros(2, 3, 5, 16, 32), gens)  # 2 latent frames
    cond = adapter.pair_conditioning(adapter.encode_prompts(["a cat"]), {})
    noisy = adapter.noisy_inputs(latents, gens[:1])
    assert adapter.predict(noisy.noisy, noisy.timesteps, cond).shape == latents.shape
    with pytest.raises(ValueError, match="9 gives 3 latent frames.*use num_frames = 5 or 13"):
        adapter.encode_images(torch.zeros(2, 3, 9, 16, 32), gens)


def test_fp8_base_weights_and_group_offload_on_cpu(model_dir, caplog):
    """fp8 storage runs on the CPU (upcast per layer); group offload is skipped with one line."""
    full = CogVideoXAdapter.load(model_cfg(model_dir), device=CPU)
    with caplog.at_level("WARNING"):
        fp8 = CogVideoXAdapter.load(model_cfg(model_dir, base_weights_dtype="fp8",
                                              group_offload=True), device=CPU)
    assert "group_offload needs a CUDA device" in caplog.text
    block = fp8.transformer.transformer_blocks[0]
    assert block.attn1.to_q.weight.dtype == torch.float8_e4m3fn
    network = SimpleNamespace(network_dim=4, network_alpha=4.0,
                              network_target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    params = fp8.add_lora(network)
    assert params and all(p.dtype == torch.float32 for p in params)
    latents = torch.randn(2, 2, 4, 2, 4, generator=torch.Generator().manual_seed(0))
    cond = full.encode_prompts(["a red square", "a cat"])
    t = torch.tensor([300, 700])
    reference = full.predict(latents, t, cond)
    pred = fp8.predict(latents, t, cond)
    assert pred.dtype == torch.float32
    rel = (pred - reference).norm() / reference.norm()
    assert 0 < rel < 0.2  # fp8 rounding of the weights, nothing worse
    pred.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


# ---------------------------------------------------------------------------------------------
# End to end


def lora_tensors(adapter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter.transformer.state_dict().items()
            if "lora_" in k}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_trains_from_the_video_manifest(objective, model_dir, manifest, tmp_path):
    extra = ["--objective", objective]
    if objective in ("dpo-cm", "sipo"):
        extra += ["--kappa", "auto"]
    result = train(load_config(None, video_overrides(model_dir, manifest, tmp_path, *extra)))
    assert result.steps == 2
    assert np.isfinite(result.last_metrics["train/loss"])
    lora = lora_tensors(result.adapter)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in lora.items()), "LoRA did not move"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len([json.loads(line) for line in lines if '"step"' in line]) >= 2


def test_exported_lora_loads_into_cogvideox_pipeline(model_dir, manifest, tmp_path):
    from diffusers import CogVideoXPipeline
    result = train(load_config(None, video_overrides(model_dir, manifest, tmp_path,
                                                     "--objective", "sft")))
    adapter = result.adapter
    path = adapter.export_lora(tmp_path / "cog_lora", lora_format="diffusers", network_alpha=2.0,
                               metadata={"ss_objective": "sft"})
    tensors = load_file(path)
    assert "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in tensors
    assert all(k.startswith("transformer.transformer_blocks.") for k in tensors)
    assert len(tensors) == 2 * 4  # to_q, to_k, to_v, to_out.0 of one block, A and B
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_objective"]) == ("4", "2.0", "sft")

    pipe = CogVideoXPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(str(path))
    latents = torch.randn(2, 2, 4, 2, 4, generator=torch.Generator().manual_seed(1))
    cond = adapter.encode_prompts(["a red square", "a red square"])
    t = torch.tensor([250, 800])
    expected = adapter.predict(latents, t, cond)
    rope = pipe._prepare_rotary_positional_embeddings(16, 32, 2, CPU)
    got = pipe.transformer(hidden_states=latents, timestep=t,
                           encoder_hidden_states=cond["encoder_hidden_states"],
                           image_rotary_emb=rope, return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with adapter.reference():  # the LoRA changes the prediction (the check is not vacuous)
        assert (adapter.predict(latents, t, cond) - expected).abs().max() > 1e-5



def test_preset_options_run_end_to_end_with_caches_and_sample_clips(model_dir, manifest, tmp_path):
    """What the presets turn on: cached latents and T5 outputs, gradient checkpointing, VAE tiling
    and slicing; the run exports a LoRA CogVideoXPipeline loads and writes a sample clip."""
    from diffusers import CogVideoXPipeline
    config = load_config(None, video_overrides(
        model_dir, manifest, tmp_path, "--objective", "sipo", "--kappa", "auto",
        "--cache_latents", "true", "--cache_text_encoder_outputs", "true",
        "--gradient_checkpointing", "true", "--vae_tiling", "true", "--vae_slicing", "true",
        "--sample_every_n_steps", "2", "--sample_prompts", '["a red square"]',
        "--sample_steps", "2", "--output_name", "cog"))
    summary = run(config)
    lora = Path(summary["lora"])
    assert lora.name == "cog.safetensors"
    pipe = CogVideoXPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(str(lora))
    assert any("lora_A" in name for name, _ in pipe.transformer.named_parameters())
    clips = sorted((tmp_path / "samples").glob("*.gif"))
    assert [c.name for c in clips] == ["cog_000000_00.gif", "cog_000002_00.gif"]  # step 0: the base
    with Image.open(clips[-1]) as gif:
        assert gif.n_frames == CogVideoXAdapter.sample_num_frames
