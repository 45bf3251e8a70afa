"""SD1.5 single-file checkpoints (original LDM key layout) load through `load_sd15_components`.

The tiny SD1.5 pipeline is saved in diffusers format (the local `model_config` folder) and, converted
by `sd15_single_file.diffusers_to_original_sd15`, as one `.safetensors` file in the CompVis layout
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`).
Loading the file with `model_config=<folder>` must reproduce the diffusers model exactly: identical
weights (bitwise), hence identical U-Net prediction, VAE decode and text-encoder output.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, fetch_diffusers_config)
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file
from sd15_single_file import diffusers_to_original_sd15
from tiny_models import tiny_sd15_pipeline

from sipo_plugin.models.sd15 import load_sd15_components
from sipo_plugin.models.single_file import config_repo_for

SEED = 0
# Same weights and the same configs run the same kernels: the outputs are expected bit-identical.
# The bound only leaves room for a different kernel choice; measured max |diff| is 0.0.
ATOL = 1e-6
PROMPTS = ["a photo of a red cat", "the blue dog"]


def _plain_config(config) -> dict:
    """Config as it reads back from JSON (tuples -> lists), without the private `_...` entries."""
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers / diffusers
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))




@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """(original pipeline, LDM checkpoint dict, checkpoint path, diffusers folder, loaded components)."""
    tmp_path = tmp_path_factory.mktemp("single_file")
    pipe = tiny_sd15_pipeline(SEED)
    folder = tmp_path / "diffusers"
    pipe.save_pretrained(folder)
    checkpoint = diffusers_to_original_sd15(pipe)
    path = tmp_path / "model.safetensors"
    save_file(checkpoint, str(path))
    components = load_sd15_components(str(path), model_config=str(folder))
    return pipe, checkpoint, path, folder, components


def test_checkpoint_uses_original_ldm_layout(single_file):
    pipe, checkpoint, *_ = single_file
    n_params = sum(len(getattr(pipe, m).state_dict()) for m in ("unet", "vae", "text_encoder"))
    assert len(checkpoint) == n_params  # every tensor mapped, none merged
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in checkpoint)
    # tiny U-Net: input_blocks 1 = down 0 resnet, 2 = downsampler, 3 = down 1 resnet + cross-attention
    for key in ("model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.input_blocks.2.0.op.weight",
                "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight",
                "model.diffusion_model.input_blocks.3.0.in_layers.2.weight",
                "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.output_blocks.1.1.proj_in.weight",
                "model.diffusion_model.output_blocks.1.2.conv.weight",
                "model.diffusion_model.output_blocks.2.0.skip_connection.weight",
                "model.diffusion_model.out.2.weight",
                "first_stage_model.encoder.down.0.downsample.conv.weight",
                "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
                "first_stage_model.decoder.mid.attn_1.proj_out.weight",
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert key in checkpoint, key
    # SD1.5 stores the VAE mid attention as 1x1 convolutions
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert not any(s in k for k in checkpoint for s in ("down_blocks", "up_blocks", "mid_block", "resnets"))


def test_loaded_weights_are_identical(single_file):
    pipe, _, _, _, components = single_file
    for name in ("unet", "vae", "text_encoder"):
        loaded, original = components[name].state_dict(), getattr(pipe, name).state_dict()
        assert loaded.keys() == original.keys(), name
        for key, value in original.items():
            assert loaded[key].device.type == "cpu", f"{name}.{key} left on {loaded[key].device}"
            assert loaded[key].dtype == value.dtype, f"{name}.{key}"
            assert torch.equal(loaded[key], value), f"{name}.{key} differs"
        assert not components[name].training
        assert _plain_config(components[name].config) == _plain_config(getattr(pipe, name).config), name


@torch.no_grad()
def test_outputs_match_diffusers_model(single_file):
    pipe, _, _, _, components = single_file
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([10, 700])
    ids = pipe.tokenizer(PROMPTS, padding="max_length", truncation=True, return_tensors="pt",
                         max_length=pipe.tokenizer.model_max_length).input_ids
    loaded_ids = components["tokenizer"](PROMPTS, padding="max_length", truncation=True, return_tensors="pt",
                                         max_length=pipe.tokenizer.model_max_length).input_ids
    assert torch.equal(loaded_ids, ids)

    image = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    cond = pipe.text_encoder(ids)[0]
    loaded = components
    outputs = {
        "text_encoder": (loaded["text_encoder"](ids)[0], cond),
        "unet": (loaded["unet"](sample, timesteps, cond).sample, pipe.unet(sample, timesteps, cond).sample),
        "vae.decode": (loaded["vae"].decode(sample).sample, pipe.vae.decode(sample).sample),
        "vae.encode": (loaded["vae"].encode(image).latent_dist.mean, pipe.vae.encode(image).latent_dist.mean),
    }
    for name, (got, want) in outputs.items():
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        assert want.abs().max() > 1e-3, f"{name}: degenerate output"


def test_training_scheduler(single_file):
    pipe, *_, components = single_file
    scheduler = components["scheduler"]
    assert isinstance(scheduler, DDPMScheduler)
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert scheduler.config[key] == pipe.scheduler.config[key], key
    torch.testing.assert_close(scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod, atol=0, rtol=0)


def test_offline_without_model_config_names_the_config_folder(single_file, hub_offline):
    _, _, path, *_ = single_file
    with pytest.raises(ValueError) as err:
        load_sd15_components(str(path))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: the model's configs could not be fetched")
    # exactly the folder diffusers wanted: its config of this checkpoint's base model
    assert "configs of a diffusers copy of stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert "model_index.json, tokenizer/, text_encoder/, vae/, unet/, scheduler/" in message


def test_without_model_config_diffusers_fetches_the_configs(single_file, monkeypatch):
    """Online, diffusers finds the configs itself: from_single_file gets no config and may download;
    a failed fetch (here: no network) is the same one line naming the folder."""
    pipe, _, path, *_ = single_file
    calls = []

    def fake_from_single_file(cls, checkpoint, **kwargs):
        calls.append(kwargs)
        if len(calls) == 2:
            raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")
        return pipe

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(fake_from_single_file))
    components = load_sd15_components(str(path))
    assert components["unet"] is pipe.unet
    assert "config" not in calls[0] and "local_files_only" not in calls[0]
    with pytest.raises(ValueError, match=r"could not be fetched \(Got: ConnectError.*"
                                         r"stable-diffusion-v1-5/stable-diffusion-v1-5"):
        load_sd15_components(str(path))


def test_config_folder_made_from_a_diffusers_copy_loads(single_file, tmp_path):
    """The README's recipe: the configs of a diffusers copy of the same base model (its weights
    left out) are enough for model_config."""
    pipe, _, path, folder, _ = single_file
    configs = tmp_path / "configs"
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(configs.rglob("*.safetensors"))
    components = load_sd15_components(str(path), model_config=str(configs))
    for name in ("unet", "vae", "text_encoder"):
        loaded = components[name].state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in getattr(pipe, name).state_dict().items())


@pytest.mark.parametrize("key, shape, repo", [
    ("model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", (4, 1024),
     "stabilityai/stable-diffusion-2-1"),
    ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias", (4,),
     "stabilityai/stable-diffusion-xl-base-1.0"),
    ("model.diffusion_model.output_blocks.11.0.skip_connection.weight", (4, 4),
     "stable-diffusion-v1-5/stable-diffusion-v1-5"),
])
def test_config_repo_is_read_from_the_header_as_diffusers_infers_it(tmp_path, key, shape, repo):
    path = tmp_path / "model.safetensors"
    tensors = {key: torch.zeros(shape)}
    save_file(tensors, str(path))
    assert fetch_diffusers_config(tensors)["pretrained_model_name_or_path"] == repo
    assert config_repo_for(path) == repo


def test_conversion_is_config_driven():
    """Another block layout (2 layers per block, 3 levels, attention first) round-trips through
    diffusers' own LDM -> diffusers converters (no files: the mapping only)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, transformer_layers_per_block=2)
    pipe = tiny_sd15_pipeline(SEED)
    pipe.unet = unet
    checkpoint = diffusers_to_original_sd15(pipe)
    assert "model.diffusion_model.input_blocks.8.0.in_layers.0.weight" in checkpoint  # 1+3*2+2 downsamplers
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in checkpoint  # UpBlock2D upsampler: .1
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in checkpoint  # CrossAttnUpBlock2D: .2
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.1.attn1.to_q.weight" in checkpoint
    for name, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        model = getattr(pipe, name)
        back = convert(checkpoint=checkpoint, config=dict(model.config))
        original = model.state_dict()
        assert back.keys() == original.keys(), name
        for key, value in original.items():
            assert torch.equal(back[key], value), f"{name}.{key}"


def test_published_file_extras_and_fp16(single_file, tmp_path):
    """Published SD1.5 files are often fp16 and carry non-module entries (the CLIP position_ids
    buffer, the DDPM schedule, EMA bookkeeping): these are ignored, and the weights load as fp32."""
    pipe, checkpoint, _, folder, _ = single_file
    published = {k: v.half() for k, v in checkpoint.items()}
    published.update({
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "alphas_cumprod": pipe.scheduler.alphas_cumprod.clone(),
        "betas": pipe.scheduler.betas.clone(),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
    })
    path = tmp_path / "model-fp16.safetensors"
    save_file(published, str(path))
    components = load_sd15_components(str(path), model_config=str(folder))
    for name in ("unet", "vae", "text_encoder"):
        loaded = components[name].state_dict()
        for key, value in getattr(pipe, name).state_dict().items():
            assert loaded[key].dtype == torch.float32, f"{name}.{key}"
            assert torch.equal(loaded[key], value.half().float()), f"{name}.{key}"
