"""Wan2.1 adapter on a tiny Wan saved in the real WanPipeline layout: flow noising, latents, text,
LoRA export in the original Wan / musubi names (round trip through WanPipeline.load_lora_weights),
config checks, low-VRAM options, and end-to-end training with every objective."""

import json
import logging
import math
import types
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline
from safetensors import safe_open
from safetensors.torch import load_file

import train_sipo
from sipo_plugin.export.wan import export_wan_lora, musubi_module_name, wan_module_name
from sipo_plugin.models.wan import (WAN_TEXT_LENGTH, WanAdapter, denormalize_latents,
                                    normalize_latents, offload_text_encoder, shift_sigmas)
from sipo_plugin.objectives import per_sample_error
from sipo_plugin.objectives.errors import PairErrors
from sipo_plugin.objectives.importance import importance_weights, pair_mask
from sipo_plugin.objectives.schedule import parametrization, snr
from sipo_plugin.training.config import ConfigError, load_config
from sipo_plugin.training.loop import train
from sipo_plugin.training.run import run
from tiny_wan import LATENTS_MEAN, LATENTS_STD, save_tiny_wan

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "presets" / "wan21_1_3b_lora_sipo.toml"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
WITH_FFN = ATTENTION + ["ffn.net.0.proj", "ffn.net.2"]
PROMPTS = ["a red cat", "the blue dog running"]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "tiny-wan")


def load_adapter(folder, **model_options) -> WanAdapter:
    cfg = types.SimpleNamespace(pretrained_model_name_or_path=str(folder), **model_options)
    return WanAdapter.load(cfg, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def adapter(wan_folder) -> WanAdapter:
    return load_adapter(wan_folder)


def network(targets=ATTENTION, dim=4, alpha=2.0):
    return types.SimpleNamespace(network_dim=dim, network_alpha=alpha,
                                 network_target_modules=list(targets))


def random_lora(folder, targets, seed=0) -> WanAdapter:
    """A fresh adapter whose LoRA is random (not the zero-init no-op)."""
    adapter = load_adapter(folder)
    generator = torch.Generator().manual_seed(seed)
    for p in adapter.add_lora(network(targets)):
        p.data = torch.randn(p.shape, generator=generator) * 0.3
    return adapter


def tiny_inputs(adapter, pairs=1, seed=0):
    """Latents [2B, 4, 2, 4, 4] (5 frames of 32x32), pair conditioning and a noisy batch."""
    generator = torch.Generator().manual_seed(seed)
    videos = torch.rand(2 * pairs, 3, 5, 32, 32, generator=generator) * 2 - 1
    latents = adapter.encode_images(videos, generator)
    cond = adapter.pair_conditioning(adapter.encode_prompts(PROMPTS[:pairs]), {})
    noisy = adapter.noisy_inputs(latents, [torch.Generator().manual_seed(seed + i)
                                           for i in range(pairs)])
    return latents, cond, noisy


# ---------------------------------------------------------------------------------------------
# flow matching


def test_flow_noising_target_and_timestep_by_hand(adapter):
    x0 = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1).repeat(2, 1, 1, 1, 1)
    eps = torch.tensor([0.2, 0.4, -1.0]).view(1, 3, 1, 1, 1).repeat(2, 1, 1, 1, 1)
    out = adapter.make_noisy(x0, eps, torch.tensor([250.0, 750.0]))
    # s = t / 1000: x_s = (1 - s) x0 + s eps, target = eps - x0
    assert torch.allclose(out.noisy[0].flatten(), torch.tensor([0.8, -1.4, 0.125]))
    assert torch.allclose(out.noisy[1].flatten(), torch.tensor([0.4, -0.2, -0.625]))
    assert torch.allclose(out.target[0].flatten(), torch.tensor([-0.8, 2.4, -1.5]))
    assert torch.equal(out.timesteps, torch.tensor([250.0, 750.0]))


def test_shift_by_hand_and_the_training_draw_is_shifted_logit_normal(adapter):
    assert adapter.flow_shift == 3.0  # the folder's scheduler_config flow_shift
    assert torch.allclose(shift_sigmas(torch.tensor([0.0, 0.5, 0.25, 1.0]), 3.0),
                          torch.tensor([0.0, 0.75, 0.5, 1.0]))
    generator = torch.Generator().manual_seed(7)
    noise, timesteps = adapter.draw_noise_and_timesteps(torch.Size([1, 4, 2, 4, 4]), generator)
    replay = torch.Generator().manual_seed(7)
    assert torch.equal(noise[0], torch.randn(4, 2, 4, 4, generator=replay))
    u = torch.sigmoid(torch.randn((), generator=replay))
    assert torch.allclose(timesteps[0], 1000 * 3 * u / (1 + 2 * u))
    _, many = adapter.draw_noise_and_timesteps(torch.Size([4000, 1]), torch.Generator().manual_seed(0))
    # sigmoid(N(0, 1)) has median 0.5; the shift maps it to 0.75
    assert abs(many.median().item() / 1000 - 0.75) < 0.03
    assert bool(((many > 0) & (many < 1000)).all())


def test_objectives_read_the_drawn_timesteps_as_s(adapter):
    scheduler = adapter.noise_scheduler
    assert parametrization(scheduler) == "flow"
    _, timesteps = adapter.draw_noise_and_timesteps(torch.Size([6, 1]), torch.Generator().manual_seed(1))
    s = timesteps.double() / 1000
    assert torch.allclose(snr(timesteps, scheduler), ((1 - s) / s) ** 2)


def test_importance_weights_are_finite_in_unit_interval_and_masked_at_the_smallest_s(adapter):
    latents, cond, _ = tiny_inputs(adapter, pairs=2)
    # s = 0.0005 and 0.001 have s_prev <= 0 (masked); the others are ordinary training timesteps
    timesteps = torch.tensor([0.5, 1.0, 50.0, 300.0, 750.0, 999.0])
    pairs = len(timesteps)
    noise = torch.randn((pairs,) + latents.shape[1:], generator=torch.Generator().manual_seed(3))
    x0 = torch.cat([latents[:1].repeat(pairs, 1, 1, 1, 1), latents[2:3].repeat(pairs, 1, 1, 1, 1)])
    noisy = adapter.make_noisy(x0, torch.cat([noise, noise]), torch.cat([timesteps, timesteps]))
    pair_cond = {k: v[:1].repeat(2 * pairs, 1, 1) for k, v in cond.items()}
    with torch.no_grad():
        err = per_sample_error(adapter.predict(noisy.noisy, noisy.timesteps, pair_cond), noisy.target)
    errors = PairErrors(err[:pairs], err[pairs:], err[:pairs], err[pairs:], timesteps,
                        adapter.noise_scheduler)
    for kappa in (1e-3, 1.0, 100.0):
        w_w, w_l = importance_weights(errors, weight_model="step", kappa=kappa)
        for w in (w_w, w_l):
            assert torch.isfinite(w).all()
            assert bool(((w >= 0) & (w <= 1)).all())
            assert w[0] == 0 and w[1] == 0, "s_prev <= 0 must give weight 0 (masked)"
        assert torch.equal(pair_mask(w_w, w_l, 0.9)[:2], torch.zeros(2))
    w_w, w_l = importance_weights(errors, weight_model="step", kappa=1e-3)
    assert bool((w_w[2:] > 0.9).all() and (w_l[2:] > 0.9).all()), "small kappa: weights near 1"


def test_winner_and_loser_share_noise_and_timestep(adapter):
    latents, _, noisy = tiny_inputs(adapter, pairs=2)
    b = 2
    assert torch.equal(noisy.timesteps[:b], noisy.timesteps[b:])
    assert not torch.equal(noisy.timesteps[0], noisy.timesteps[1])
    # target = eps - x0, so target + x0 is the noise: the same for winner and loser
    noise = noisy.target + latents
    assert torch.allclose(noise[:b], noise[b:], atol=1e-6)
    assert not torch.allclose(latents[:b], latents[b:])


# ---------------------------------------------------------------------------------------------
# latents and text


def test_latents_are_the_vae_mean_normalized_per_channel(adapter):
    videos = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = adapter.encode_images(videos, torch.Generator())
    assert latents.shape == (2, 4, 2, 4, 4)  # 1 + (5 - 1) / 4 frames, 32 / 8 pixels
    with torch.no_grad():
        z = adapter.vae.encode(videos).latent_dist.mean
    for c in range(4):
        assert torch.allclose(latents[:, c], (z[:, c] - LATENTS_MEAN[c]) / LATENTS_STD[c], atol=1e-6)
    assert torch.allclose(denormalize_latents(latents, LATENTS_MEAN, LATENTS_STD), z, atol=1e-6)
    x = torch.randn(3, 4, 2, 3, 3)
    assert torch.allclose(normalize_latents(denormalize_latents(x, LATENTS_MEAN, LATENTS_STD),
                                            LATENTS_MEAN, LATENTS_STD), x, atol=1e-6)


def test_bad_clip_shape_is_one_line(adapter):
    with pytest.raises(ValueError, match=r"4k\+1 frames.*got 4 frames of 32x32"):
        adapter.encode_images(torch.zeros(2, 3, 4, 32, 32), torch.Generator())
    with pytest.raises(ValueError, match="divisible by 16"):
        adapter.encode_images(torch.zeros(2, 3, 5, 24, 32), torch.Generator())


def test_text_embeddings_match_wan_pipeline_zero_padded_to_512(adapter):
    cond = adapter.encode_prompts(PROMPTS)["encoder_hidden_states"]
    assert cond.shape == (2, WAN_TEXT_LENGTH, 32)
    pipe = adapter.sampling_pipeline()
    expected, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                     max_sequence_length=512, device="cpu")
    assert torch.allclose(cond, expected, atol=1e-6)
    for row, prompt in zip(cond, PROMPTS):
        tokens = len(adapter.tokenizer(prompt).input_ids)  # words + </s>
        assert bool((row[:tokens].abs().sum(-1) > 0).all())
        assert bool((row[tokens:] == 0).all())


# ---------------------------------------------------------------------------------------------
# export


def test_wan_module_names_follow_diffusers_converter():
    assert wan_module_name("blocks.0.attn1.to_q") == "blocks.0.self_attn.q"
    assert wan_module_name("blocks.12.attn1.to_out.0") == "blocks.12.self_attn.o"
    assert wan_module_name("blocks.3.attn2.to_v") == "blocks.3.cross_attn.v"
    assert wan_module_name("blocks.3.attn2.add_k_proj") == "blocks.3.cross_attn.k_img"
    assert wan_module_name("blocks.1.ffn.net.0.proj") == "blocks.1.ffn.0"
    assert wan_module_name("blocks.1.ffn.net.2") == "blocks.1.ffn.2"
    assert wan_module_name("proj_out") == "head.head"
    assert wan_module_name("condition_embedder.time_proj") == "time_projection.1"
    assert musubi_module_name("blocks.1.ffn.0") == "lora_unet_blocks_1_ffn_0"
    with pytest.raises(ValueError, match="patch_embedding.*no original Wan name"):
        wan_module_name("patch_embedding")


def expected_keys(fmt: str, modules) -> set[str]:
    if fmt == "wan":
        return {f"diffusion_model.blocks.{i}.{m}.lora_{ab}.weight"
                for i in (0, 1) for m in modules for ab in "AB"}
    return {f"lora_unet_blocks_{i}_{m.replace('.', '_')}.{part}"
            for i in (0, 1) for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")}


ATTN_WAN = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"]


def test_wan_format_keys_and_folded_scale(wan_folder, tmp_path):
    adapter = random_lora(wan_folder, ATTENTION)
    path = adapter.export_lora(tmp_path / "lora", lora_format="wan", network_alpha=2.0,
                               metadata={"ss_objective": "sipo"})
    assert path == tmp_path / "lora.safetensors"
    tensors = load_file(path)
    assert set(tensors) == expected_keys("wan", ATTN_WAN)
    layer = adapter.transformer.blocks[1].attn2.to_out[0]
    assert torch.equal(tensors["diffusion_model.blocks.1.cross_attn.o.lora_A.weight"],
                       layer.lora_A["default"].weight)
    assert torch.allclose(tensors["diffusion_model.blocks.1.cross_attn.o.lora_B.weight"],
                          layer.lora_B["default"].weight * 2.0 / 4)  # alpha / rank folded
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_objective"] == "sipo" and meta["ss_network_dim"] == "4"
    assert "sshs_model_hash" in meta


def test_musubi_format_keys_and_alpha(wan_folder, tmp_path):
    adapter = random_lora(wan_folder, WITH_FFN)
    path = adapter.export_lora(tmp_path / "m.safetensors", lora_format="musubi", network_alpha=2.0,
                               metadata={})
    tensors = load_file(path)
    assert set(tensors) == expected_keys("musubi", ATTN_WAN + ["ffn.0", "ffn.2"])
    assert all(tensors[k].ndim == 0 and tensors[k].item() == 2.0 for k in tensors if k.endswith(".alpha"))
    layer = adapter.transformer.blocks[0].ffn.net[0].proj
    assert torch.equal(tensors["lora_unet_blocks_0_ffn_0.lora_up.weight"], layer.lora_B["default"].weight)


def test_musubi_export_without_ffn_is_refused(wan_folder, tmp_path):
    adapter = random_lora(wan_folder, ATTENTION)
    with pytest.raises(ValueError, match=r"musubi.*blocks\.0\.ffn\.0 has none"):
        adapter.export_lora(tmp_path / "m.safetensors", lora_format="musubi", network_alpha=2.0,
                            metadata={})
    with pytest.raises(ValueError, match="not a Wan LoRA format"):
        adapter.export_lora(tmp_path / "k.safetensors", lora_format="kohya", network_alpha=2.0,
                            metadata={})


OUTSIDE_BLOCKS = ["to_q", "proj_out", "time_proj", "linear_1", "linear_2"]  # head, embedders


@pytest.mark.parametrize("fmt, targets", [("wan", ATTENTION), ("wan", WITH_FFN), ("musubi", WITH_FFN),
                                          ("wan", OUTSIDE_BLOCKS)])
def test_exported_lora_reproduces_predictions_in_a_fresh_wan_pipeline(wan_folder, tmp_path, fmt,
                                                                       targets):
    adapter = random_lora(wan_folder, targets, seed=3)
    _, cond, noisy = tiny_inputs(adapter)
    with torch.no_grad():
        trained = adapter.predict(noisy.noisy, noisy.timesteps, cond)
        with adapter.reference():
            base = adapter.predict(noisy.noisy, noisy.timesteps, cond)
    assert (trained - base).abs().max() > 1e-2, "the LoRA must change predictions"
    path = adapter.export_lora(tmp_path / "lora.safetensors", lora_format=fmt, network_alpha=2.0,
                               metadata={})
    pipe = WanPipeline.from_pretrained(wan_folder)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        loaded = pipe.transformer(hidden_states=noisy.noisy, timestep=noisy.timesteps,
                                  encoder_hidden_states=cond["encoder_hidden_states"],
                                  return_dict=False)[0]
    assert torch.allclose(loaded, trained, atol=1e-5)


def test_export_of_a_state_dict_needs_alpha(tmp_path):
    state = {"blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 8),
             "blocks.0.attn1.to_q.lora_B.weight": torch.ones(8, 2)}
    with pytest.raises(ValueError, match="network_alpha is required"):
        export_wan_lora(tmp_path / "x.safetensors", transformer=state, network_alpha=None)
    path = export_wan_lora(tmp_path / "x.safetensors", transformer=state, network_alpha=1.0)
    assert torch.equal(load_file(path)["diffusion_model.blocks.0.self_attn.q.lora_B.weight"],
                       torch.full((8, 2), 0.5))


# ---------------------------------------------------------------------------------------------
# low-VRAM options


def test_fp8_base_weights_keep_the_lora_fp32_and_trainable(wan_folder):
    adapter = load_adapter(wan_folder, base_weights_dtype="fp8")
    assert adapter.transformer.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    params = adapter.add_lora(network())
    assert all(p.dtype == torch.float32 for p in params)
    _, cond, noisy = tiny_inputs(adapter)
    pred = adapter.predict(noisy.noisy, noisy.timesteps, cond)
    fp32 = load_adapter(wan_folder)
    with torch.no_grad():
        ref = fp32.predict(noisy.noisy, noisy.timesteps, cond)
    assert torch.isfinite(pred).all()
    assert (pred - ref).abs().mean() < 0.1 * ref.abs().mean()  # fp8 rounding, not garbage
    (pred - noisy.target).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_group_offload_is_ignored_on_cpu_with_one_line(wan_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="sipo_plugin.models.wan"):
        adapter = load_adapter(wan_folder, group_offload=True, vae_tiling=True, vae_slicing=True)
    assert not adapter.group_offloaded
    assert [r.getMessage() for r in caplog.records] == ["group_offload needs a CUDA device; ignored on cpu"]
    assert adapter.vae.use_tiling and adapter.vae.use_slicing


def test_group_offloaded_text_encoder_gives_the_same_embeddings(wan_folder):
    # CPU -> CPU without streams runs the same hooks that move UMT5 layers to the GPU on CUDA
    adapter = load_adapter(wan_folder)
    expected = adapter.encode_prompts(PROMPTS)["encoder_hidden_states"]
    offload_text_encoder(adapter.text_encoder, torch.device("cpu"), use_stream=False)
    assert torch.equal(adapter.encode_prompts(PROMPTS)["encoder_hidden_states"], expected)


def test_gradient_checkpointing_gives_the_same_lora_gradients(wan_folder):
    grads = []
    for checkpointing in (False, True):
        adapter = random_lora(wan_folder, ATTENTION, seed=1)
        if checkpointing:
            adapter.enable_gradient_checkpointing()
            adapter.transformer.train()
        _, cond, noisy = tiny_inputs(adapter)
        adapter.predict(noisy.noisy, noisy.timesteps, cond).square().mean().backward()
        grads.append([p.grad.clone() for p in adapter.transformer.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# ---------------------------------------------------------------------------------------------
# config, preset, end to end


@pytest.fixture(scope="module")
def video_manifest(tmp_path_factory) -> Path:
    from tiny_video import write_video_pairs
    return write_video_pairs(tmp_path_factory.mktemp("clips"), num_pairs=1, num_frames=5,
                             height=32, width=32)


def wan_overrides(wan_folder, manifest, output_dir, *extra) -> list[str]:
    return ["--family", "wan", "--pretrained_model_name_or_path", str(wan_folder),
            "--train_data", str(manifest), "--num_frames", "5", "--video_height", "32",
            "--video_width", "32", "--lora_format", "wan", "--output_dir", str(output_dir),
            "--max_train_steps", "2", "--train_batch_size", "1", "--learning_rate", "1e-3",
            "--calibration_pairs", "4", "--logging_steps", "1", "--network_dim", "4", *extra]


def test_config_refuses_kohya_and_musubi_without_ffn(wan_folder, video_manifest, tmp_path):
    base = wan_overrides(wan_folder, video_manifest, tmp_path)
    with pytest.raises(ConfigError, match="'lora_format' must be one of wan, musubi, got 'kohya'"):
        load_config(None, base + ["--lora_format", "kohya"])
    with pytest.raises(ConfigError, match=r"musubi.*add 'ffn\.net\.0\.proj', 'ffn\.net\.2'") as err:
        load_config(None, base + ["--lora_format", "musubi"])
    assert "\n" not in str(err.value)
    config = load_config(None, base + ["--lora_format", "musubi",
                                       "--network_target_modules", json.dumps(WITH_FFN)])
    assert config.export.lora_format == "musubi"
    with pytest.raises(ConfigError, match="train_text_encoder is not supported for Wan"):
        load_config(None, base + ["--train_text_encoder", "true"])
    with pytest.raises(ConfigError, match="finetune = \"full\" trains them"):
        load_config(None, base + ["--finetune", "full", "--base_weights_dtype", "fp8"])


def test_preset_checks_once_paths_are_filled_in(wan_folder, video_manifest, capsys):
    assert train_sipo.main(["--preset", str(PRESET), "--check"]) == 2  # placeholder paths
    assert "not found" in capsys.readouterr().err
    assert train_sipo.main(["--preset", str(PRESET), "--check", "--pretrained_model_name_or_path",
                            str(wan_folder), "--train_data", str(video_manifest)]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["model"]["family"] == "wan"
    assert (resolved["data"]["num_frames"], resolved["data"]["frame_fps"]) == (81, 16.0)
    assert (resolved["data"]["video_height"], resolved["data"]["video_width"]) == (480, 832)
    assert resolved["export"]["lora_format"] == "wan"


@pytest.mark.parametrize("objective", ["diffusion-dpo", "dpo-cm", "sipo", "sft"])  # ~2 s each
def test_every_objective_trains_on_video_pairs_and_exports(wan_folder, video_manifest, tmp_path,
                                                           objective):
    config = load_config(None, wan_overrides(wan_folder, video_manifest, tmp_path,
                                             "--objective", objective))
    summary = run(config)
    lora = load_file(summary["lora"])
    assert set(lora) == expected_keys("wan", ATTN_WAN)
    ups = [v for k, v in lora.items() if k.endswith("lora_B.weight")]
    assert any(v.abs().max() > 0 for v in ups), "LoRA did not move from its zero init"
    assert all(torch.isfinite(v).all() for v in lora.values())
    rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    logged = [r for r in rows if "step" in r]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) for r in logged)
    with safe_open(summary["lora"], "pt") as f:
        meta = f.metadata()
    assert meta["ss_objective"] == objective and meta["modelspec.architecture"] == "wan2.1/lora"
    assert meta["modelspec.prediction_type"] == "flow" and meta["modelspec.resolution"] == "32x32"


@pytest.mark.parametrize("fmt", ["wan", "musubi"])
def test_the_preset_trains_with_its_memory_options_on_the_tiny_model(wan_folder, video_manifest,
                                                                      tmp_path, fmt):
    # the preset as shipped (bf16, text-encoder cache, VAE tiling, gradient checkpointing) plus
    # fp8 base weights, on 5 x 32 x 32 clips
    extra = ["--lora_format", "musubi", "--network_target_modules", json.dumps(WITH_FFN)] \
        if fmt == "musubi" else []
    config = load_config(PRESET, [
        "--pretrained_model_name_or_path", str(wan_folder), "--train_data", str(video_manifest),
        "--num_frames", "5", "--video_height", "32", "--video_width", "32",
        "--max_train_steps", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
        "--calibration_pairs", "4", "--dataloader_num_workers", "0", "--log_with", "none",
        "--output_dir", str(tmp_path), "--save_every_n_steps", "0", "--network_dim", "4",
        "--base_weights_dtype", "fp8", *extra])
    assert config.data.cache_text_encoder_outputs and config.training.gradient_checkpointing
    summary = run(config)
    lora = load_file(summary["lora"])
    modules = ATTN_WAN + (["ffn.0", "ffn.2"] if fmt == "musubi" else [])
    assert set(lora) == expected_keys(fmt, modules)
    up = "lora_up.weight" if fmt == "musubi" else "lora_B.weight"
    assert any(v.abs().max() > 0 for k, v in lora.items() if k.endswith(up))
    pipe = WanPipeline.from_pretrained(wan_folder)
    pipe.load_lora_weights(summary["lora"])  # diffusers accepts the trained file
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())


def test_sampling_pipeline_generates_a_clip_with_the_lora(wan_folder):
    adapter = random_lora(wan_folder, ATTENTION, seed=5)
    pipe = adapter.sampling_pipeline()
    pipe.set_progress_bar_config(disable=True)
    assert adapter.sampling_kwargs() == {"num_frames": 33, "height": 480, "width": 832}
    clips = []
    for enabled in (True, False):
        adapter.set_adapters_enabled(enabled)
        clips.append(pipe("a red cat", num_frames=5, height=32, width=32, num_inference_steps=2,
                          guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                          output_type="pt").frames)
    adapter.set_adapters_enabled(True)
    assert clips[0].shape == (1, 5, 3, 32, 32)
    assert (clips[0] - clips[1]).abs().max() > 1e-3


@pytest.mark.parametrize("extra", [["--reference", "cached", "--cache_latents", "true"],
                                   ["--finetune", "full"]])
def test_flow_timesteps_in_the_reference_modes(wan_folder, video_manifest, tmp_path, extra):
    # float timesteps (sigma * 1000) through the cached pre-pass, and full fine-tuning's frozen copy
    config = load_config(None, wan_overrides(wan_folder, video_manifest, tmp_path, *extra))
    result = train(config)
    rows = [json.loads(line) for line in result.metrics_log.read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "step" in r]
    assert losses and all(math.isfinite(x) for x in losses)
