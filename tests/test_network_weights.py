"""network_weights: starting from an existing LoRA (kohya or diffusers file), reference = "initial"."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from sipo_plugin.toy.pipeline import load_toy_pipeline
from sipo_plugin.training.config import ConfigError
from sipo_plugin.training.loop import train
from sipo_plugin.training.run import export
from test_training import (assert_same_trained_weights, load_adapter, short_run,
                           straight_and_resumed)

PROMPTS = ["a red circle on a gray background", "a blue square"]
RANK, ALPHA = 4, 2.0


def make_lora_file(manifest, tmp_path, lora_format="kohya", text_encoder=True, seed=0):
    """A non-zero LoRA (rank 4, alpha 2) of the toy model, written as a user's file would be."""
    config = short_run(manifest, tmp_path / "maker", "--network_dim", str(RANK), "--network_alpha",
                       str(ALPHA), "--train_text_encoder", str(text_encoder).lower())
    adapter = load_adapter(config)
    adapter.add_lora(config.network)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in adapter.trainable_modules():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    suffix = ".safetensors" if lora_format == "kohya" else ""
    path = adapter.export_lora(tmp_path / f"start{suffix}", lora_format=lora_format,
                               network_alpha=ALPHA, metadata={})
    return path, adapter


def unet_outputs(unet, encode, seed=0) -> torch.Tensor:
    """The U-Net's prediction on fixed latents for PROMPTS (``encode``: prompts -> embeddings)."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([500, 20]), encode(PROMPTS)).sample


def adapter_outputs(adapter) -> torch.Tensor:
    return unet_outputs(adapter.unet, lambda p: adapter.encode_prompts(p)["encoder_hidden_states"])


def diffusers_outputs(lora_file) -> torch.Tensor:
    """Predictions of a fresh toy pipeline with ``lora_file`` loaded by diffusers."""
    pipe = load_toy_pipeline()
    pipe.load_lora_weights(str(lora_file))
    return unet_outputs(pipe.unet, lambda p: pipe.encode_prompt(p, "cpu", 1, False)[0])


@pytest.mark.parametrize("lora_format", ["kohya", "diffusers"])
def test_network_weights_loads_the_file_exactly(manifest, tmp_path, lora_format, capsys):
    """The trained adapter starts as the file's LoRA: the same predictions as the model that wrote
    it and as diffusers' load_lora_weights; rank, alpha and text encoder come from the file."""
    path, maker = make_lora_file(manifest, tmp_path, lora_format)
    capsys.readouterr()
    config = short_run(manifest, tmp_path / "run", "--network_weights", str(path))
    notes = capsys.readouterr().out.splitlines()
    assert (config.network.network_dim, config.network.network_alpha) == (
        RANK, ALPHA if lora_format == "kohya" else RANK)
    assert config.network.train_text_encoder
    assert len(notes) == 1 and "network_dim 4 (preset: 8)" in notes[0]
    assert "train_text_encoder true (preset: false)" in notes[0]
    adapter = load_adapter(config)
    adapter.add_lora(config.network)
    ours = adapter_outputs(adapter)
    torch.testing.assert_close(ours, adapter_outputs(maker), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, diffusers_outputs(path), rtol=1e-4, atol=1e-5)
    with adapter.reference():  # reference = "base": the adapter off
        base = adapter_outputs(adapter)
    assert (ours - base).abs().max() > 1e-3, "the starting LoRA must be non-zero"


def first_loss(manifest, tmp_path, path, reference) -> tuple[float, object]:
    config = short_run(manifest, tmp_path / reference, "--network_weights", str(path),
                       "--reference", reference, "--objective", "diffusion-dpo",
                       "--max_train_steps", "2", "--save_precision", "float")
    result = train(config)
    rows = [json.loads(line) for line in result.metrics_log.read_text().splitlines()]
    return [r for r in rows if "step" in r][0]["train/loss"], (config, result)


def test_reference_initial_starts_at_ln2_and_base_does_not(manifest, tmp_path):
    path, _ = make_lora_file(manifest, tmp_path)
    initial, (config, result) = first_loss(manifest, tmp_path, path, "initial")
    base, _ = first_loss(manifest, tmp_path, path, "base")
    assert initial == pytest.approx(math.log(2), abs=1e-6)
    assert abs(base - math.log(2)) > 1e-4, base
    # the reference adapter stayed the starting LoRA, the trained one moved
    adapter = result.adapter
    trained = adapter_outputs(adapter)
    with adapter.reference():
        reference = adapter_outputs(adapter)
    torch.testing.assert_close(reference, diffusers_outputs(path), rtol=1e-4, atol=1e-5)
    assert (trained - reference).abs().max() > 0, "the LoRA did not train"
    # the export is the refined LoRA, in the original's layout, loadable where it was
    refined = export(config, result)
    assert set(load_file(refined)) == set(load_file(path))
    torch.testing.assert_close(diffusers_outputs(refined), trained, rtol=1e-4, atol=1e-5)


def _bad(manifest, tmp_path, path, *extra) -> str:
    with pytest.raises(ConfigError) as err:
        short_run(manifest, tmp_path, "--network_weights", str(path), *extra)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_bad_network_weights_are_one_line(manifest, tmp_path):
    path, _ = make_lora_file(manifest, tmp_path, text_encoder=False)
    tensors = load_file(path)
    sdxl = {k.replace("lora_unet_", "lora_unet_input_blocks_1_"): v for k, v in tensors.items()}
    te1 = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    sdxl.update({f"{te1}.lora_down.weight": torch.zeros(4, 32), f"{te1}.lora_up.weight": torch.zeros(37, 4),
                 f"{te1}.alpha": torch.tensor(1.0)})
    save_file(sdxl, tmp_path / "sdxl.safetensors")
    assert "an SDXL LoRA" in _bad(manifest, tmp_path, tmp_path / "sdxl.safetensors")
    dora = dict(tensors)
    for key in [k for k in tensors if k.endswith("lora_down.weight")]:
        dora[key.replace("lora_down.weight", "dora_scale")] = torch.ones(4, 1)
    save_file(dora, tmp_path / "dora.safetensors")
    assert "DoRA file" in _bad(manifest, tmp_path, tmp_path / "dora.safetensors")
    loha = {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.alpha": torch.tensor(1.0)}
    save_file(loha, tmp_path / "loha.safetensors")
    assert "LoHa, not LoRA" in _bad(manifest, tmp_path, tmp_path / "loha.safetensors")
    assert "no LoRA file" in _bad(manifest, tmp_path, tmp_path / "missing.safetensors")
    # another rank layout / base model: shapes that do not fit the model's layers (at load)
    wrong = {k: (torch.zeros(v.shape[0], v.shape[1] + 1) if k.endswith("lora_down.weight") else v)
             for k, v in tensors.items()}
    save_file(wrong, tmp_path / "wrong.safetensors")
    config = short_run(manifest, tmp_path / "w", "--network_weights", str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="another base model or rank layout") as err:
        load_adapter(config).add_lora(config.network)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="reference = \"initial\" is the LoRA of network_weights"):
        short_run(manifest, tmp_path, "--reference", "initial")


def test_initial_reference_adapter_stays_frozen_while_the_trained_one_moves(manifest, tmp_path):
    """reference = "initial": a second adapter holds the file's weights; switching to it for the
    reference and back leaves only the trained adapter requiring grad, and moving the trained one
    does not move the reference."""
    path, _ = make_lora_file(manifest, tmp_path)
    config = short_run(manifest, tmp_path / "run", "--network_weights", str(path),
                       "--reference", "initial")
    adapter = load_adapter(config)
    adapter.reference_adapter = "initial"  # what make_reference sets for reference = "initial"
    params = adapter.add_lora(config.network)
    named = {n for m in adapter.trainable_modules() for n, p in m.named_parameters() if p.requires_grad}
    assert named and all(".default." in n for n in named)
    assert sum(p.numel() for p in params) * 2 == sum(
        p.numel() for m in adapter.trainable_modules() for n, p in m.named_parameters() if "lora_" in n)
    start = adapter_outputs(adapter)
    with adapter.reference():
        torch.testing.assert_close(adapter_outputs(adapter), start, rtol=0, atol=0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05)
    moved = adapter_outputs(adapter)
    with adapter.reference():
        reference = adapter_outputs(adapter)
    assert (moved - start).abs().max() > 1e-3
    torch.testing.assert_close(reference, start, rtol=0, atol=0)
    assert all(p.requires_grad for p in params)
    assert {n for m in adapter.trainable_modules() for n, p in m.named_parameters()
            if p.requires_grad} == named


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["initial", "base"])
def test_a_run_from_network_weights_interrupted_then_resumed_ends_with_the_same_lora(
        manifest, tmp_path, reference):
    """Resume of a run that started from a LoRA file: the trained LoRA continues from the
    checkpoint (not from the file), and reference = "initial" is still the file's LoRA."""
    path, _ = make_lora_file(manifest, tmp_path)
    straight, resumed = straight_and_resumed(
        manifest, tmp_path, "--network_weights", str(path), "--network_dim", str(RANK),
        "--network_alpha", str(ALPHA), "--reference", reference, "--max_train_steps", "4",
        "--save_every_n_steps", "2", "--lr_scheduler", "linear")
    assert_same_trained_weights(straight, resumed)
    if reference == "initial":  # the frozen reference adapter is the file's LoRA after resume too
        with resumed.adapter.reference():
            torch.testing.assert_close(adapter_outputs(resumed.adapter), diffusers_outputs(path),
                                       rtol=1e-4, atol=1e-5)
