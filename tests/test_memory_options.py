"""Low-VRAM options: optimizers and their fallbacks, gradient checkpointing, xformers fallback,
bf16 weights, and sample images during training."""

import pytest
import torch
from PIL import Image

from sipo_plugin.training import memory
from sipo_plugin.training.config import ConfigError, TrainingConfig, load_config
from sipo_plugin.training.loop import train

from test_training import lora_weights, short_run


def params():
    return [torch.nn.Parameter(torch.randn(64, 128))]


def test_adamw8bit_uses_bitsandbytes_when_it_loads():
    pytest.importorskip("bitsandbytes")
    optimizer = memory.build_optimizer(params(), TrainingConfig(optimizer_type="AdamW8bit"), print)
    assert memory.optimizer_name(optimizer) == "bitsandbytes.optim.adamw.AdamW8bit"


def test_adamw8bit_without_bitsandbytes_falls_back_to_adamw_with_one_line(monkeypatch):
    real_find_spec = memory.importlib.util.find_spec
    monkeypatch.setattr(memory.importlib.util, "find_spec",
                        lambda name: None if name == "bitsandbytes" else real_find_spec(name))
    lines = []
    optimizer = memory.build_optimizer(params(), TrainingConfig(optimizer_type="AdamW8bit"),
                                       lines.append)
    assert type(optimizer) is torch.optim.AdamW
    assert len(lines) == 1 and "pip install bitsandbytes" in lines[0]


def test_adafactor_with_a_fixed_learning_rate():
    optimizer = memory.build_optimizer(params(), TrainingConfig(optimizer_type="Adafactor",
                                                                learning_rate=3e-4), print)
    assert memory.optimizer_name(optimizer) == "transformers.optimization.Adafactor"
    group = optimizer.param_groups[0]
    assert group["lr"] == 3e-4 and group["relative_step"] is False


def test_unknown_optimizer_is_rejected_with_the_choices():
    with pytest.raises(ConfigError, match="optimizer_type.*AdamW8bit"):
        load_config(None, ["--optimizer_type", "SGDNesterov"])


def test_xformers_on_cpu_falls_back_to_sdpa_with_one_line():
    lines = []
    assert memory.enable_xformers([torch.nn.Linear(2, 2)], torch.device("cpu"), lines.append) is False
    assert len(lines) == 1 and "SDPA" in lines[0]


def test_full_bf16_needs_bf16_mixed_precision():
    with pytest.raises(ConfigError, match="full_bf16"):
        load_config(None, ["--full_bf16", "true"])


def test_gradient_checkpointing_recomputes_and_gives_the_same_training(manifest, tmp_path, monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = lora_weights(train(short_run(manifest, tmp_path / "plain", "--objective", "diffusion-dpo")).adapter)
    assert not calls
    ckpt = train(short_run(manifest, tmp_path / "ckpt", "--objective", "diffusion-dpo",
                           "--gradient_checkpointing", "true")).adapter
    assert calls, "gradient checkpointing was not used"
    for key, value in lora_weights(ckpt).items():
        torch.testing.assert_close(value, plain[key], rtol=0, atol=1e-6)


def test_adafactor_and_full_bf16_train_the_lora(manifest, tmp_path):
    config = short_run(manifest, tmp_path, "--objective", "diffusion-dpo", "--optimizer_type",
                       "Adafactor", "--mixed_precision", "bf16", "--full_bf16", "true")
    result = train(config)
    weights = lora_weights(result.adapter)
    assert result.optimizer == "transformers.optimization.Adafactor"
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    assert any(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k)


def test_sample_images_every_n_steps_with_a_fixed_seed(manifest, tmp_path):
    config = short_run(manifest, tmp_path, "--objective", "sft", "--max_train_steps", "2",
                       "--sample_every_n_steps", "1", "--sample_prompts", '["a red circle", "a blue square"]',
                       "--sample_steps", "2", "--learning_rate", "1e-12")
    train(config)
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == [f"sipo_lora_00000{s}_0{i}.png" for s in (0, 1, 2) for i in (0, 1)]  # 0: base
    # an unchanged model and the same seed give the same image at every step, the base's included
    first, second = (Image.open(tmp_path / "samples" / f"sipo_lora_00000{s}_00.png") for s in (0, 2))
    assert first.tobytes() == second.tobytes()


def test_tensorboard_logging_through_accelerate_trackers(manifest, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(short_run(manifest, tmp_path, "--objective", "diffusion-dpo", "--log_with", "tensorboard"))
    runs = [p.parent for p in tmp_path.rglob("events.out.tfevents.*")]
    assert runs, "no TensorBoard event file written"
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]  # logging_steps = 1
    assert all(e.value > 0 for e in loss)
