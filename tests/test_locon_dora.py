"""LoCon (conv_dim / conv_alpha) and DoRA (use_dora) on SD1.5 and SDXL: what is wrapped, the
sd-scripts key names, and exports that reproduce the trained model's predictions."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file
from tiny_models import tiny_sd15_components
from tiny_sdxl import tiny_sdxl_components

from sipo_plugin.data.batch import PairBatch
from sipo_plugin.models.sd15 import SD15Adapter
from sipo_plugin.models.sdxl import SDXLAdapter
from sipo_plugin.training.config import NetworkConfig

CPU = torch.device("cpu")
PROMPTS = ["a red circle", "a blue square"]
FAMILIES = {"sd15": (SD15Adapter, tiny_sd15_components, StableDiffusionPipeline),
            "sdxl": (SDXLAdapter, tiny_sdxl_components, StableDiffusionXLPipeline)}


def trained_adapter(family: str, *, conv_dim=0, use_dora=False, text_encoder=True, seed=1):
    """A tiny model of ``family`` with a LoRA (rank 4, alpha 2; LoCon convs rank 2, alpha 1) whose
    weights are randomized as if trained (lora_B and DoRA magnitudes moved off their init)."""
    adapter_cls, components, _ = FAMILIES[family]
    adapter = adapter_cls(components(), device=CPU, weight_dtype=torch.float32)
    network = NetworkConfig(network_dim=4, network_alpha=2.0, conv_dim=conv_dim, conv_alpha=1.0,
                            use_dora=use_dora, train_text_encoder=text_encoder)
    adapter.add_lora(network)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in adapter.trainable_modules():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
                elif "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    return adapter


def predictions(adapter) -> torch.Tensor:
    """The U-Net prediction for PROMPTS on fixed latents (SDXL: with its size ids)."""
    g = torch.Generator().manual_seed(0)
    unet = adapter.unet
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    with torch.no_grad():
        batch = PairBatch(latents=latents, weights=torch.ones(1), indices=torch.zeros(1))
        cond = adapter.pair_conditioning(adapter.encode_prompts(PROMPTS[:1]), batch)
        return adapter.predict(latents, torch.tensor([500, 20]), cond)


def loaded_in_diffusers(family: str, lora_file) -> torch.Tensor:
    """Predictions of a fresh pipeline with ``lora_file`` loaded by ``load_lora_weights``."""
    adapter_cls, components, pipeline_cls = FAMILIES[family]
    extra = {"safety_checker": None, "feature_extractor": None,
             "requires_safety_checker": False} if family == "sd15" else {}
    pipe = pipeline_cls(**components(), **extra)
    pipe.load_lora_weights(str(lora_file))
    view = adapter_cls({**pipe.components, "scheduler": pipe.scheduler}, device=CPU,
                       weight_dtype=torch.float32)
    return predictions(view)


def export(adapter, path, lora_format):
    return adapter.export_lora(path, lora_format=lora_format, network_alpha=None, metadata={})


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("lora_format", ["kohya", "diffusers"])
def test_locon_export_reproduces_predictions_in_diffusers(family, lora_format, tmp_path):
    adapter = trained_adapter(family, conv_dim=2)
    suffix = ".safetensors" if lora_format == "kohya" else ""
    file = export(adapter, tmp_path / f"locon{suffix}", lora_format)
    expected = predictions(adapter)
    with adapter.reference():
        base = predictions(adapter)
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded_in_diffusers(family, file), expected, rtol=1e-4, atol=1e-5)


def test_locon_wraps_sd_scripts_conv_layers_with_their_key_names(tmp_path):
    """conv_dim wraps every ResNet / down / upsampler layer as sd-scripts' LoCon: 3x3 convs at
    conv_dim, 1x1 shortcut and time projection at network_dim; kohya names as sd-scripts writes
    them (SD1.5: diffusers paths; SDXL: in_layers_2 / out_layers_3 / emb_layers_1 /
    skip_connection / op / conv under input_blocks / middle_block / output_blocks)."""
    sd15 = load_file(export(trained_adapter("sd15", conv_dim=2, text_encoder=False),
                            tmp_path / "a.safetensors", "kohya"))
    downs = {k.removesuffix(".lora_down.weight"): v.shape for k, v in sd15.items()
             if k.endswith("lora_down.weight")}
    assert downs["lora_unet_down_blocks_0_resnets_0_conv1"] == (2, 32, 3, 3)
    assert downs["lora_unet_down_blocks_0_resnets_0_time_emb_proj"][0] == 4
    assert downs["lora_unet_down_blocks_0_downsamplers_0_conv"] == (2, 32, 3, 3)
    assert any(k.startswith("lora_unet_up_blocks_0_upsamplers_0_conv") for k in downs)
    assert any(k.endswith("_conv_shortcut") and v[0] == 4 for k, v in downs.items())
    assert any(k.endswith("_attn1_to_q") for k in downs)
    sdxl = load_file(export(trained_adapter("sdxl", conv_dim=2, text_encoder=False),
                            tmp_path / "b.safetensors", "kohya"))
    names = {k.split(".")[0] for k in sdxl}
    for expected in ("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_out_layers_3",
                     "lora_unet_input_blocks_1_0_emb_layers_1", "lora_unet_input_blocks_3_0_op",
                     "lora_unet_middle_block_0_in_layers_2"):
        assert expected in names, expected
    assert any(n.startswith("lora_unet_output_blocks_") and n.endswith("_conv") for n in names)
    assert any(n.endswith("_skip_connection") for n in names)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_dora_diffusers_export_reproduces_predictions(family, tmp_path):
    adapter = trained_adapter(family, use_dora=True)
    file = export(adapter, tmp_path / "dora", "diffusers")
    keys = load_file(file)
    assert any(k.endswith("lora_magnitude_vector.weight") for k in keys)
    torch.testing.assert_close(loaded_in_diffusers(family, file), predictions(adapter),
                               rtol=1e-4, atol=1e-5)


def comfyui_merge(unet: torch.nn.Module, tensors: dict, namer) -> None:
    """Merge a kohya DoRA file into ``unet``'s weights the way ComfyUI's weight_decompose does
    (output axis): W' = dora_scale * (W + a/r up@down) / ||W + a/r up@down||_row."""
    with torch.no_grad():
        for path, module in unet.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            name = "lora_unet_" + namer(path).replace(".", "_")
            if f"{name}.lora_down.weight" not in tensors:
                continue
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
            diff = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
            calc = module.weight + scale * diff
            norm = calc.reshape(calc.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (calc.ndim - 1))
            module.weight.copy_(calc * (tensors[f"{name}.dora_scale"] / norm))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_dora_kohya_export_has_dora_scale_and_merges_like_comfyui(family, tmp_path):
    """The kohya DoRA file: dora_scale [out, 1(, 1, 1)] per module; merged with ComfyUI's
    formula it reproduces the trained model; network_weights reads it back exactly."""
    adapter = trained_adapter(family, use_dora=True, text_encoder=False)
    file = export(adapter, tmp_path / "dora.safetensors", "kohya")
    tensors = load_file(file)
    scales = {k: v for k, v in tensors.items() if k.endswith(".dora_scale")}
    assert len(scales) == sum(k.endswith(".lora_down.weight") for k in tensors)
    assert all(v.shape[1:] in ((1,), (1, 1, 1)) for v in scales.values())
    expected = predictions(adapter)
    merged_adapter = FAMILIES[family][0](FAMILIES[family][1](), device=CPU, weight_dtype=torch.float32)
    namer = merged_adapter.kohya_unet_namer() or (lambda p: p)
    comfyui_merge(merged_adapter.unet, tensors, namer)
    torch.testing.assert_close(predictions(merged_adapter), expected, rtol=1e-4, atol=1e-5)
    again = FAMILIES[family][0](FAMILIES[family][1](), device=CPU, weight_dtype=torch.float32)
    again.add_lora(NetworkConfig(network_weights=str(file), use_dora=True))
    torch.testing.assert_close(predictions(again), expected, rtol=1e-5, atol=1e-6)


def test_network_args_metadata():
    adapter = trained_adapter("sd15", conv_dim=2, use_dora=True, text_encoder=False)
    config = type("C", (), {"network": NetworkConfig(conv_dim=2, conv_alpha=1.0, use_dora=True)})()
    meta = adapter.network_metadata(config)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1", "dora_wd": "True"}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_locon_file_starts_a_run_with_its_conv_layers(family, tmp_path):
    """network_weights of a LoCon file: conv_dim / conv_alpha come from the file's header, and the
    injected adapter reproduces the file's model exactly."""
    from sipo_plugin.export.lora_file import summarize_lora_file
    adapter = trained_adapter(family, conv_dim=2)
    file = export(adapter, tmp_path / "locon.safetensors", "kohya")
    summary = summarize_lora_file(file)
    assert (summary.rank, summary.conv_rank, summary.dora) == (4, 2, False)
    assert summary.components == ("unet", "text_encoder", *(("text_encoder_2",) if family == "sdxl" else ()))
    again = FAMILIES[family][0](FAMILIES[family][1](), device=CPU, weight_dtype=torch.float32)
    again.add_lora(NetworkConfig(network_weights=str(file), conv_dim=2, conv_alpha=1.0))
    torch.testing.assert_close(predictions(again), predictions(adapter), rtol=1e-5, atol=1e-6)
