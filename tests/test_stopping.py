"""Stopping without losing work and finding things (issue 10, points 6 and 9): the LoRA of a run
stopped by an error or SIGTERM is saved, no temp file is left, a killed run's temp files are
removed, NaN/inf is traced to its source; TensorBoard under output_name, --help by section,
error lines on their own line, output_name inside output_dir."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import train_sipo
from sipo_plugin.data import PairBatchSampler, PairDataError
from sipo_plugin.toy.registration import TOY_MODEL_DIR
from sipo_plugin.training.config import ConfigError, describe_keys, load_config
from sipo_plugin.training.loop import NonFiniteLossError, train
from sipo_plugin.training.memory import quiet_bitsandbytes
from sipo_plugin.training.run import run
from sipo_plugin.training.stopping import nonfinite_loss_message, remove_stale_temp_files
from sipo_plugin.utils.io import atomic_write_bytes
from test_training import make_rendered_pairs

ROOT = Path(__file__).resolve().parents[1]
ANY_DATA = ["--train_data", str(ROOT)]  # an existing path: enough for the config alone


def short_config(manifest: Path, out: Path, *extra: str):
    return load_config(None, ["--train_data", str(manifest), "--resolution", "32",
                              "--output_dir", str(out), "--max_train_steps", "2",
                              "--train_batch_size", "2", "--learning_rate", "1e-3",
                              "--calibration_pairs", "4", "--logging_steps", "1",
                              "--output_name", "lora", *extra])


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_stale_temp_files_are_removed_from_this_output_dir_only(tmp_path):
    out, other = tmp_path / "run", tmp_path / "other"
    for folder in (out, out / "checkpoints", other):
        folder.mkdir(parents=True, exist_ok=True)
    stale = [out / ".lora.safetensors.ab12_x9z.tmp", out / "checkpoints" / ".state.json.q1w2e3r4.tmp"]
    kept = [out / "notes.tmp", out / ".hidden.tmp", other / ".lora.safetensors.ab12_x9z.tmp"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    assert sorted(remove_stale_temp_files(out)) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    # the pattern is the one utils.io really uses: a temp file it creates matches
    import tempfile
    fd, name = tempfile.mkstemp(dir=out, prefix=".x.safetensors.", suffix=".tmp")
    os.close(fd)
    assert remove_stale_temp_files(out) == [Path(name)]


def test_output_name_cannot_escape_output_dir():
    for bad in ("../evil", "sub/name", "/abs", "..", ""):
        with pytest.raises(ConfigError, match="'output_name' must be a plain file name"):
            load_config(None, ["--output_name", json.dumps(bad)])
    assert load_config(None, [*ANY_DATA, "--output_name", "my.lora-v2"]).training.output_name == "my.lora-v2"


def test_nonfinite_loss_is_traced_to_its_source():
    finite, bad = torch.ones(4), torch.tensor([1.0, float("nan"), 1.0, 1.0])
    assert "reference errors (the base model's predictions)" in nonfinite_loss_message(
        float("nan"), bad, bad, {}, "fp16")
    assert "not a kappa or learning-rate problem" in nonfinite_loss_message(
        float("nan"), finite, bad, {}, "no")
    assert "training diverged" in nonfinite_loss_message(float("nan"), bad, finite, {}, "no")
    assert "on finite errors" in nonfinite_loss_message(float("inf"), finite, finite, {}, "no")


def test_nan_in_the_base_weights_is_named_before_training(manifest, tmp_path):
    model = tmp_path / "toy_nan"
    shutil.copytree(TOY_MODEL_DIR, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = sorted(k for k in state if k.endswith("weight"))[3]
    state[name][0] = float("nan")
    save_file(state, weights)
    config = short_config(manifest, tmp_path / "run", "--pretrained_model_name_or_path", str(model))
    with pytest.raises(NonFiniteLossError, match=rf"base model's weight unet\.{name}.*not a kappa"):
        train(config)


def pairs_with_corrupt_third_batch(tmp_path: Path, seed: int) -> Path:
    """Six pairs; an image of the third batch in the data order is corrupt (accelerate's loader
    fetches one batch ahead: the error comes while step 2's batch is handed out, after step 1)."""
    manifest = make_rendered_pairs(tmp_path / "pairs", n_pairs=6)
    third = PairBatchSampler(6, 2, seed=seed, total=3).epoch_batches(0)[2]
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    (manifest.parent / rows[third[0]]["rejected"]).write_bytes(b"\x89PNG truncated")
    return manifest


def test_an_error_after_step_1_saves_the_lora_first(tmp_path):
    manifest = pairs_with_corrupt_third_batch(tmp_path, seed=42)
    out = tmp_path / "run"
    config = short_config(manifest, out, "--skip_data_check", "true", "--calibration_pairs", "2",
                          "--objective", "diffusion-dpo", "--max_train_steps", "3")
    with pytest.raises(PairDataError, match="cannot decode image"):
        run(config)
    saved = out / "lora-interrupted.safetensors"
    assert saved.is_file() and not (out / "lora.safetensors").exists()
    with safe_open(str(saved), "pt") as f:
        assert f.metadata()["ss_steps"] == "1"
        assert any(f.get_tensor(k).abs().max() > 0 for k in f.keys() if "lora_up" in k)
    assert temp_files(out) == []


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    """A subprocess trains; SIGTERM after its first logged step: exit 130, the LoRA so far saved,
    no temp file left; a stale temp file of an earlier killed run is gone too."""
    manifest = make_rendered_pairs(tmp_path / "pairs", n_pairs=4)
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".lora.safetensors.zz99zz99.tmp"
    stale.write_bytes(b"left by kill -9")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train_sipo.py"), "--train_data", str(manifest),
         "--resolution", "32", "--output_dir", str(out), "--output_name", "lora",
         "--max_train_steps", "100000", "--train_batch_size", "2", "--calibration_pairs", "2",
         "--logging_steps", "1", "--objective", "diffusion-dpo"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and '"step"' in metrics.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "error: interrupted (signal SIGTERM)" in err
    saved = out / "lora-interrupted.safetensors"
    assert saved.is_file() and load_file(saved)
    assert temp_files(out) == [] and not stale.exists()


def test_tensorboard_logs_under_output_name(manifest, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(short_config(manifest, out, "--log_with", "tensorboard", "--max_train_steps", "1",
                       "--objective", "sft"))
    assert list((out / "lora").rglob("events.out.tfevents.*"))


def test_bitsandbytes_is_quiet_unless_8_bit_is_used():
    logger = logging.getLogger("bitsandbytes")
    before = logger.level
    try:
        logger.setLevel(logging.NOTSET)
        quiet_bitsandbytes(load_config(None, [*ANY_DATA, "--optimizer_type", "AdamW8bit"]).training)
        assert logger.level == logging.NOTSET
        quiet_bitsandbytes(load_config(None, ANY_DATA).training)
        assert logger.getEffectiveLevel() == logging.ERROR
        assert not logging.getLogger("bitsandbytes.backends.cpu.ops").isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(before)


def test_error_lines_start_on_their_own_line(capsys):
    bar = tqdm(total=10, file=sys.stderr, desc="training")
    bar.update(3)
    train_sipo.print_errors(["first problem", "second problem"])
    err = capsys.readouterr().err
    assert "\nerror: first problem\nerror: second problem\n" in err


def test_help_lists_every_setting_by_section(capsys):
    with pytest.raises(SystemExit):
        train_sipo.main(["--help"])
    text = capsys.readouterr().out
    position = -1
    for section, key, _default, _help in describe_keys():
        header = text.index(f"\n[{section}]\n")
        assert f"  --{key} (default" in text[header:], key
        assert header >= position  # sections in order, each once
        position = header


def test_loss_watch_names_nonfinite_reference_errors_without_a_per_step_sync():
    from sipo_plugin.training.loop import LossWatch
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    watch = LossWatch()
    watch.add({"loss": one, "mse/ref_w": one, "mse/ref_l": one})
    watch.check(1, {})  # all finite: nothing raised
    watch.add({"loss": nan, "mse/ref_w": nan, "mse/ref_l": one})
    with pytest.raises(NonFiniteLossError, match=r"by step 2: the reference errors \(the base model"):
        watch.check(2, {})
    diverged = LossWatch()  # finite reference errors: the objective or learning rate, not the model
    diverged.add({"loss": nan, "mse/ref_w": one, "mse/ref_l": one})
    with pytest.raises(NonFiniteLossError, match="lower learning_rate or beta"):
        diverged.check(3, {})
    no_reference = LossWatch()  # sft: no reference metrics at all
    no_reference.add({"loss": nan})
    with pytest.raises(NonFiniteLossError, match="lower learning_rate or beta"):
        no_reference.check(4, {})
