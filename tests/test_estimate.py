"""--estimate: weights, trained parameters, gradients, optimizer states and the reference equal the
tensors a real step allocates on the CPU (tiny models); the report and its one-line errors."""

from __future__ import annotations

import pytest
import torch

from sipo_plugin.estimate import config_for_estimate, estimate_report
from sipo_plugin.estimate.architectures import PUBLISHED
from sipo_plugin.estimate.build import build_module
from sipo_plugin.estimate.estimate import estimate
from sipo_plugin.estimate.states import ParamShape, optimizer_state_bytes
from sipo_plugin.models import get_model_adapter
from sipo_plugin.training.config import load_config
from sipo_plugin.training.loop import WEIGHT_DTYPES
from sipo_plugin.training.memory import (build_optimizer, cast_trainable_to_bf16, optimizer_kwargs,
                                         param_groups)
from sipo_plugin.training.reference import FrozenCopyReference, make_reference

from test_training import Log
from train_sipo import main


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages among ``tensors`` (shared quantization maps count once)."""
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def real_step(config) -> dict:
    """What the trainer allocates (its own setup calls), after one forward, backward and step."""
    t = config.training
    adapter = get_model_adapter(config.model.family).load(
        config.model, device=torch.device("cpu"), weight_dtype=WEIGHT_DTYPES[t.mixed_precision])
    reference = make_reference(config, adapter, Log())
    params = adapter.add_trainable(config.network)
    if t.full_bf16:
        cast_trainable_to_bf16(params)
    optimizer = build_optimizer(param_groups(params, adapter.trainable_modules()[0], t), t, print)
    unet = adapter.unet
    side = config.data.resolution // 8
    x = torch.randn(2, unet.config.in_channels, side, side)
    cond = {"encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim)}
    if unet.config.get("addition_embed_type") == "text_time":
        width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        cond.update(text_embeds=torch.randn(2, width), time_ids=torch.ones(2, 6))
    if adapter.trains_text_encoder:  # its LoRA takes part in the step
        cond = adapter.encode_prompts(["a red cat", "a blue dog"])
    adapter.predict(x, torch.tensor([10, 500]), cond).float().pow(2).mean().backward()
    optimizer.step()
    states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    out = {"gradients": sum(p.grad.numel() * p.grad.element_size() for p in params),
           "optimizer": storage_bytes(states), "trained": sum(p.numel() for p in params),
           "reference": 0}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(adapter, name, None)
        if module is not None:
            out[name] = storage_bytes([*module.parameters(), *module.buffers()])
    if isinstance(reference, FrozenCopyReference):
        out["reference"] = storage_bytes([*reference.module.parameters(), *reference.module.buffers()])
    return out


def estimated(config) -> dict:
    result = estimate(config)
    by = {}
    for part in result.parts:
        key = part.name.split(":")[-1].split()[0] if part.name.startswith("weights") else part.name
        key = {"gradients": "gradients"}.get(key, key)
        if part.name.startswith("optimizer"):
            key = "optimizer"
        elif part.name.startswith("reference"):
            key = "reference" if part.place == "device" else "cached reference"
        by[key] = by.get(key, 0) + part.bytes
    by["trained"] = result.trained_params
    return by


def tiny_sdxl_folder(tmp_path_factory):
    from tiny_sdxl import save_tiny_sdxl
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "model")


CASES = {
    "lora AdamW": [],
    "lora AdamW8bit (tiny: 32-bit states)": ["--optimizer_type", "AdamW8bit"],
    "full AdamW8bit, frozen copy in bf16": ["--finetune", "full", "--optimizer_type", "AdamW8bit",
                                            "--reference_dtype", "bf16"],
    "lora Adafactor, bf16 weights": ["--optimizer_type", "Adafactor", "--mixed_precision", "bf16",
                                     "--full_bf16", "true"],
    "lora Prodigy, LoCon, text encoder": ["--optimizer_type", "Prodigy", "--learning_rate", "1.0",
                                          "--conv_dim", "4", "--train_text_encoder", "true"],
    "full Lion8bit, fp16, cached reference": [
        "--finetune", "full", "--optimizer_type", "Lion8bit", "--mixed_precision", "fp16",
        "--reference", "cached", "--cache_latents", "true"],
    "lora Adafactor with beta1, DoRA": ["--optimizer_type", "Adafactor", "--use_dora", "true",
                                        "--optimizer_args", '["beta1=0.9"]'],
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_parts_equal_the_allocated_tensors(case, manifest, tmp_path):
    if "bit" in case:
        pytest.importorskip("bitsandbytes")
    if "Prodigy" in case:
        pytest.importorskip("prodigyopt")
    config = load_config(None, ["--train_data", str(manifest), "--resolution", "32",
                                "--output_dir", str(tmp_path), *CASES[case]])
    real, guess = real_step(config), estimated(config)
    for key in ("trained", "gradients", "optimizer", "reference", "unet", "vae", "text_encoder"):
        assert guess.get(key, 0) == real.get(key, 0), (key, guess, real)
    if config.training.reference == "cached":  # 8 pairs x 4 draws x (errors [2] fp32 + t int64)
        assert guess["cached reference"] == 8 * 4 * (2 * 4 + 8)


def test_sdxl_exact_parts(manifest, tmp_path, tmp_path_factory):
    folder = tiny_sdxl_folder(tmp_path_factory)
    config = load_config(None, ["--family", "sdxl", "--pretrained_model_name_or_path", str(folder),
                                "--train_data", str(manifest), "--resolution", "64",
                                "--output_dir", str(tmp_path), "--mixed_precision", "bf16",
                                "--optimizer_type", "AdamW8bit"])
    real, guess = real_step(config), estimated(config)
    for key in ("trained", "gradients", "optimizer", "unet", "vae", "text_encoder", "text_encoder_2"):
        assert guess.get(key, 0) == real.get(key, 0), (key, guess, real)


def test_adamw8bit_quantizes_large_parameters_by_hand():
    """Hand-computed: a 64 x 128 matrix (8192 >= 4096 elements) keeps two uint8 states and 32
    float32 absmax per state; a 10-element bias two float32 states; two 1 KiB maps once."""
    big, small = ParamShape((64, 128), 4), ParamShape((10,), 4)
    device, _ = optimizer_state_bytes([big, small], "AdamW8bit", {})
    assert device == 2 * (8192 + 4 * 32) + 2 * 4 * 10 + 2 * 1024
    adamw, host = optimizer_state_bytes([big, small], "AdamW", {})
    assert adamw == 2 * 4 * (8192 + 10) and host == 8
    factored, _ = optimizer_state_bytes([big, small], "Adafactor", {})
    assert factored == 4 * (64 + 128) + 4 * 10 + 2 * 4  # + one RMS scalar each


def test_published_architectures_have_the_published_sizes():
    counts = {name: sum(p.numel() for p in build_module(cls, cfg).parameters())
              for name, (cls, cfg) in {**PUBLISHED["sdxl"], "sd15_unet": PUBLISHED["sd15"]["unet"]}.items()}
    assert counts == {"sd15_unet": 859_520_964, "unet": 2_567_463_684, "vae": 83_653_863,
                      "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


def test_preset_without_its_model_uses_the_published_architecture(capsys):
    assert main(["--preset", "presets/sdxl_lora_sipo_8gb.toml", "--estimate", "--vram", "8", "24"]) == 0
    out = capsys.readouterr().out
    assert "published SDXL base 1.0 architecture" in out
    assert "weights: unet (bf16)" in out and "2,567,463,684 elements" in out
    assert "released after caching" in out  # cached text-encoder outputs: encoders leave the GPU
    assert "24 GB: fits" in out


def test_video_preset_and_bad_preset_give_one_line(capsys, tmp_path):
    assert main(["--preset", "presets/wan21_1_3b_lora_sipo.toml", "--estimate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not estimated yet" in err[0]
    bad = tmp_path / "bad.toml"
    bad.write_text('[training]\nlearning_rate = "fast"\n')
    assert main(["--preset", str(bad), "--estimate"]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_activations_scale_with_pairs_and_checkpointing_saves(manifest, tmp_path):
    config, _ = config_for_estimate(None, ["--train_data", str(manifest), "--resolution", "32",
                                           "--output_dir", str(tmp_path), "--train_batch_size", "2"])
    table = estimate(config, resolutions=[64]).activations
    assert table[(2, 32, False)] > table[(1, 32, False)] > 0
    assert table[(1, 64, False)] > table[(1, 32, False)]
    assert table[(1, 64, True)] < table[(1, 64, False)]
    assert "1 GB: fits" in estimate_report(config, [1.0])
