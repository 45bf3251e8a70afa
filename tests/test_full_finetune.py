"""Full fine-tuning: every U-Net weight trains against a frozen (or cached) base; export is a
diffusers folder that loads back with the trained weights; checkpoints resume exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file
from diffusers import StableDiffusionPipeline

from sipo_plugin.training.config import ConfigError
from sipo_plugin.training.loop import train
from sipo_plugin.training.run import export
from test_training import (assert_same_trained_weights, load_adapter, short_run,
                           straight_and_resumed)


def base_unet_state(config) -> dict:
    adapter = load_adapter(config)
    return {k: v.clone() for k, v in adapter.unet.state_dict().items()}


def test_full_finetune_changes_the_unet_while_the_frozen_copy_stays_the_base(manifest, tmp_path):
    config = short_run(manifest, tmp_path, "--finetune", "full", "--reference", "frozen_copy",
                       "--objective", "diffusion-dpo")
    base = base_unet_state(config)
    result = train(config)
    trained = result.adapter.unet.state_dict()
    copy = result.reference.module.state_dict()
    assert trained.keys() == base.keys() == copy.keys()
    assert all(torch.equal(copy[k], base[k]) for k in base), "the reference copy moved"
    changed = [k for k in base if not torch.equal(trained[k], base[k])]
    assert len(changed) > 0.9 * len(base), f"only {len(changed)} of {len(base)} tensors trained"
    assert not any("lora" in k for k in trained)
    te = result.adapter.text_encoder
    assert not any(p.requires_grad for p in te.parameters()), "the text encoder must stay frozen"


def test_full_finetune_exports_a_diffusers_folder_with_the_trained_unet(manifest, tmp_path):
    config = short_run(manifest, tmp_path, "--finetune", "full", "--max_train_steps", "1",
                       "--output_name", "tuned")
    result = train(config)
    folder = export(config, result)
    assert folder == tmp_path / "tuned" and (folder / "model_index.json").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    meta = json.loads((folder / "sipo_training.json").read_text())
    assert meta["ss_objective"] == "sipo" and meta["ss_save_precision"] == "fp16"
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    loaded = pipe.unet.state_dict()
    trained = result.adapter.unet.state_dict()
    # save_precision fp16 (the default): the saved U-Net is the trained one rounded to fp16, while
    # the live model keeps fp32
    saved = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(saved[k].dtype == torch.float16 for k in trained)
    assert all(torch.equal(loaded[k], trained[k].half().float()) for k in trained)
    assert all(v.dtype == torch.float32 for v in trained.values())
    assert pipe.vae.dtype == torch.float32, "only the trained denoiser takes save_precision"
    # the export replaces a previous folder in one piece
    assert export(config, result) == folder and not list(tmp_path.glob(".tuned*"))


def test_full_finetune_with_cached_reference_keeps_no_copy(manifest, tmp_path):
    result = train(short_run(manifest, tmp_path, "--finetune", "full", "--reference", "cached",
                             "--cache_latents", "true", "--max_train_steps", "2"))
    assert result.reference is None
    n_unet = sum(p.numel() for p in result.adapter.unet.parameters())
    assert sum(p.numel() for p in result.adapter.unet.parameters() if p.requires_grad) == n_unet


@pytest.mark.slow
def test_full_finetune_interrupted_then_resumed_ends_with_the_same_unet(manifest, tmp_path):
    from sipo_plugin.training.checkpoint import list_checkpoints, load_checkpoint
    straight, resumed = straight_and_resumed(manifest, tmp_path, "--finetune", "full",
                                             "--max_train_steps", "4", "--save_every_n_steps", "2",
                                             "--learning_rate", "1e-4")
    saved = load_checkpoint(list_checkpoints(tmp_path / "a")[0])["lora"]
    assert len(saved) == len(list(straight.adapter.unet.parameters()))  # the whole U-Net
    assert_same_trained_weights(straight, resumed)


def test_full_finetune_config_errors(manifest, tmp_path):
    with pytest.raises(ConfigError, match="trains the U-Net only; set train_text_encoder = false"):
        short_run(manifest, tmp_path, "--finetune", "full", "--train_text_encoder", "true")
    with pytest.raises(ConfigError, match="'finetune' must be one of"):
        short_run(manifest, tmp_path, "--finetune", "dreambooth")


def test_toy_evaluation_of_a_full_finetune_samples_a_fresh_base(manifest, tmp_path):
    from sipo_plugin.training.run import run
    summary = run(short_run(manifest, tmp_path, "--finetune", "full", "--max_train_steps", "2",
                            "--eval_after_training", "true", "--eval_samples", "4",
                            "--eval_prompts", "toy", "--eval_rewards", '["colour"]',
                            "--sampler_steps", "2"))
    stats = summary["eval"]
    assert stats["n_samples"] == 4 and (tmp_path / "eval.json").is_file()
    assert stats["tuned_reward"] != stats["base_reward"]  # the tuned U-Net samples differently
