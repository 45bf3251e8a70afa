"""sd-scripts' training options: unet_lr / text_encoder_lr parameter groups, max_train_epochs,
optimizers by name (Prodigy, Lion, Lion8bit), optimizer_args, and wandb through accelerate."""

import os
import time

import pytest
import torch

from sipo_plugin.data import read_pairs
from sipo_plugin.training import memory
from sipo_plugin.training.config import TrainingConfig
from sipo_plugin.training.loop import train, with_epoch_steps

from test_training import short_run


def test_param_groups_split_denoiser_and_text_encoder():
    denoiser, text_encoder = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    params = [*denoiser.parameters(), *text_encoder.parameters()]
    groups = memory.param_groups(params, denoiser, TrainingConfig(learning_rate=1e-4, unet_lr=3e-4,
                                                                  text_encoder_lr=5e-5))
    assert [(len(g["params"]), g["lr"]) for g in groups] == [(2, 3e-4), (2, 5e-5)]
    groups = memory.param_groups(params, denoiser, TrainingConfig(learning_rate=1e-4))
    assert [g["lr"] for g in groups] == [1e-4, 1e-4]  # 0: learning_rate
    optimizer = memory.build_optimizer(groups, TrainingConfig(optimizer_args=["betas=0.8,0.9",
                                                                              "weight_decay=0.3"]), print)
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    assert optimizer.param_groups[1]["weight_decay"] == 0.3


def test_unet_and_text_encoder_learning_rates_in_a_run(manifest, tmp_path):
    """Adam's first step moves each weight by lr * g / (|g| + eps), about lr: the LoRA up
    matrices (zero at init, the only ones with a gradient) end at about their group's rate."""
    result = train(short_run(manifest, tmp_path, "--objective", "diffusion-dpo", "--max_train_steps",
                             "1", "--train_text_encoder", "true", "--unet_lr", "1e-3",
                             "--text_encoder_lr", "1e-5", "--adam_weight_decay", "0"))
    adapter = result.adapter
    up_unet = max(v.abs().max().item() for k, v in adapter.unet.state_dict().items() if "lora_B" in k)
    up_te = max(v.abs().max().item() for k, v in adapter.text_encoder.state_dict().items()
                if "lora_B" in k)
    assert up_unet == pytest.approx(1e-3, rel=0.01)
    assert up_te == pytest.approx(1e-5, rel=0.01)


def test_max_train_epochs_sets_the_steps(manifest, tmp_path):
    config = short_run(manifest, tmp_path, "--max_train_epochs", "3", "--gradient_accumulation_steps",
                       "2")
    records = read_pairs(manifest)  # 8 pairs, batch 2: 4 micro-batches an epoch, 2 steps
    assert with_epoch_steps(config, records, num_processes=1).training.max_train_steps == 6
    assert with_epoch_steps(config, records, num_processes=2).training.max_train_steps == 3
    result = train(short_run(manifest, tmp_path / "run", "--objective", "diffusion-dpo",
                             "--max_train_epochs", "1"))
    assert result.steps == 4


@pytest.mark.parametrize("name, expected", [("Lion", "bitsandbytes.optim.lion.Lion"),
                                            ("Lion8bit", "bitsandbytes.optim.lion.Lion8bit"),
                                            ("Prodigy", "prodigyopt.prodigy.Prodigy")])
def test_optimizers_by_name(name, expected):
    pytest.importorskip("prodigyopt" if name == "Prodigy" else "bitsandbytes")
    params = [torch.nn.Parameter(torch.randn(64, 128))]
    optimizer = memory.build_optimizer(params, TrainingConfig(optimizer_type=name, learning_rate=1.0,
                                                              optimizer_args=["d_coef=2"] if name == "Prodigy" else []),
                                       print)
    assert memory.optimizer_name(optimizer) == expected


@pytest.mark.parametrize("name, package", [("Prodigy", "prodigyopt"), ("Lion", "bitsandbytes")])
def test_missing_optimizer_package_is_one_line(monkeypatch, name, package):
    real_find_spec = memory.importlib.util.find_spec
    monkeypatch.setattr(memory.importlib.util, "find_spec",
                        lambda n: None if n == package else real_find_spec(n))
    with pytest.raises(ValueError, match=f"optimizer_type = {name} needs {package} "
                                         rf"\(pip install {package}\)"):
        memory.build_optimizer([torch.nn.Parameter(torch.zeros(2))],
                               TrainingConfig(optimizer_type=name), print)


def test_optimizer_args_the_optimizer_refuses_are_one_line():
    with pytest.raises(ValueError, match=r"optimizer_args \['d_coef=2'\]: AdamW refuses them"):
        memory.build_optimizer([torch.nn.Parameter(torch.zeros(2))],
                               TrainingConfig(optimizer_args=["d_coef=2"]), print)


@pytest.mark.slow
def test_wandb_offline_run_named_by_output_name(manifest, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    train(short_run(manifest, tmp_path / "out", "--objective", "diffusion-dpo", "--log_with", "wandb",
                    "--output_name", "my_style_v1"))
    runs = list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, os.listdir(tmp_path / "wandb_dir")
    expected = (b"my_style_v1", b"train/loss", b"train/implicit_acc")
    deadline = time.time() + 60  # wandb's service may still be flushing after finish()
    while True:  # the run's protobuf records: its name and the logged metric keys
        data = runs[0].read_bytes()
        if all(key in data for key in expected) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert all(key in data for key in expected), data[:200]
