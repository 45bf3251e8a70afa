"""Checkpoints are safetensors + JSON folders, written atomically; pickles are never loaded."""

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

import train_sipo
from sipo_plugin.training.checkpoint import (CheckpointError, flatten_optimizer_state,
                                             list_checkpoints, load_checkpoint, resolve_resume,
                                             unflatten_optimizer_state)
from sipo_plugin.training.loop import train
from test_training import short_run


class _WritesMarker:
    """Unpickling this object creates ``path`` (what a malicious step_N.pt could do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def crafted_pickle(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "lora": {}, "payload": _WritesMarker(marker)}, path)
    return path


@pytest.fixture(scope="module")
def saved_run(manifest, tmp_path_factory):
    """A 2-step run that saved a checkpoint at each step."""
    out = tmp_path_factory.mktemp("saved")
    train(short_run(manifest, out, "--max_train_steps", "2", "--save_every_n_steps", "1"))
    return out


def test_the_crafted_pickle_does_write_its_marker_when_unpickled(tmp_path):
    """The test below could fail: torch.load(weights_only=False) of such a file runs its code."""
    probe = tmp_path / "probe_marker"
    torch.load(crafted_pickle(tmp_path / "probe.pt", probe), weights_only=False)
    assert probe.exists()


@pytest.mark.parametrize("how", ["latest", "file", "analyze"])
def test_a_pickled_checkpoint_is_refused_without_unpickling(how, manifest, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "marker"
    pt = crafted_pickle(out / "checkpoints" / "step_0000002.pt", marker)
    argv = ["--train_data", str(manifest), "--output_dir", str(out), "--resolution", "32",
            "--train_batch_size", "2", "--max_train_steps", "3",
            "--resume", "latest" if how == "latest" else str(pt)]
    if how == "analyze":
        argv = ["--analyze", "--analysis-pairs", "2", *argv]
    assert train_sipo.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "step_0000002.pt: a pickled checkpoint" in err and "can run any code" in err
    assert not marker.exists()


def test_checkpoint_is_a_folder_of_safetensors_and_json(saved_run):
    first, second = list_checkpoints(saved_run)
    assert sorted(p.name for p in second.iterdir()) == [
        "checkpoint.json", "optimizer.safetensors", "trained.safetensors"]
    state = json.loads((second / "checkpoint.json").read_text())
    assert state["step"] == 2 and state["config"]["training"]["max_train_steps"] == 2
    assert state["objective_name"] == "sipo" and state["objective_hyperparameters"]["kappa"] > 0
    assert state["lr_scheduler"]["last_epoch"] == 2 and len(state["run_id"]) == 16
    assert state["data"]["pairs"] == 8
    loaded = load_checkpoint(second)
    assert loaded["step"] == 2 and len(loaded["lora"]) > 0
    # AdamW: step, exp_avg, exp_avg_sq per trained tensor, each a tensor in optimizer.safetensors
    assert len(loaded["optimizer"]["state"]) == len(loaded["lora"])
    assert set(loaded["optimizer"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert load_checkpoint(first)["run_id"] == state["run_id"]


def _adamw8bit(params):
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.AdamW8bit(params, lr=1e-2, betas=(0.8, 0.95))


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95)),
    lambda params: torch.optim.Adafactor(params, lr=1e-2),
    _adamw8bit], ids=["AdamW", "Adafactor", "AdamW8bit"])
def test_optimizer_state_round_trips_exactly(make):
    torch.manual_seed(0)  # 8192 elements: AdamW8bit keeps its state in 8 bits (nested dict)
    weights = [torch.nn.Parameter(torch.randn(128, 64)), torch.nn.Parameter(torch.randn(4))]
    optimizer = make(weights)
    for _ in range(3):
        sum((w ** 2).sum() for w in weights).backward()
        optimizer.step()
        optimizer.zero_grad()
    tensors, rest = flatten_optimizer_state(optimizer.state_dict())
    assert tensors and all(k.split(".")[0] in ("0", "1") for k in tensors)
    tensors = safetensors.torch.load(safetensors.torch.save(tensors))  # as written and read back
    rest = json.loads(json.dumps(rest))  # what checkpoint.json holds
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    restored = make(copies)
    restored.load_state_dict(unflatten_optimizer_state(tensors, rest))
    for params, opt in ((weights, optimizer), (copies, restored)):  # one more step each
        sum((w ** 2).sum() for w in params).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, copies, strict=True))


def test_half_written_checkpoints_are_never_resumed(saved_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved_run / "checkpoints", out / "checkpoints")
    # a save killed mid-way leaves a temp folder, or (written by hand) a folder without its json
    shutil.copytree(out / "checkpoints" / "step_0000002", out / "checkpoints" / ".step_0000003.x.tmp")
    incomplete = out / "checkpoints" / "step_0000004"
    shutil.copytree(out / "checkpoints" / "step_0000002", incomplete)
    (incomplete / "checkpoint.json").unlink()
    assert resolve_resume("latest", out).name == "step_0000002"


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temp_folder(saved_run, tmp_path,
                                                                         monkeypatch):
    from safetensors.torch import save_file as real_save_file

    from sipo_plugin.training import checkpoint
    out = tmp_path / "run"
    shutil.copytree(saved_run / "checkpoints", out / "checkpoints")
    state = load_checkpoint(out / "checkpoints" / "step_0000002")
    calls = []

    def disk_full_on_second_file(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save_file(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", disk_full_on_second_file)
    info = {k: state[k] for k in ("run_id", "lr_scheduler", "objective_name",
                                  "objective_hyperparameters", "config", "data")}
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.save_checkpoint(out, 3, trained=state["lora"], optimizer_state=state["optimizer"],
                                   info=info)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    assert resolve_resume("latest", out).name == "step_0000002"


def test_resume_of_something_else_says_what_it_is(saved_run, tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints .*start without"):
        resolve_resume("latest", tmp_path / "empty")
    with pytest.raises(CheckpointError, match="resume checkpoint not found"):
        resolve_resume(str(tmp_path / "nothing"), tmp_path)
    lora = tmp_path / "x.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 2)}, str(lora),
              metadata={"ss_network_module": "networks.lora"})
    with pytest.raises(CheckpointError, match=r"x\.safetensors: a LoRA file, not a training checkpoint"):
        resolve_resume(str(lora), tmp_path)
    foreign = tmp_path / "notes.txt"
    foreign.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a sipo-plugin checkpoint"):
        resolve_resume(str(foreign), tmp_path)
    with pytest.raises(CheckpointError, match="no readable checkpoint.json"):
        resolve_resume(str(tmp_path), tmp_path)
    # the folder, or any file in it, names the checkpoint
    folder = saved_run / "checkpoints" / "step_0000001"
    assert resolve_resume(str(folder / "trained.safetensors"), tmp_path) == folder
    assert resolve_resume(str(folder), tmp_path) == folder


def test_no_code_in_the_package_unpickles():
    """Every torch.load in the package passes weights_only=True, and nothing imports pickle."""
    import re
    root = Path(__file__).resolve().parents[1]
    sources = [*sorted((root / "sipo_plugin").rglob("*.py")), root / "train_sipo.py"]
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(", text):  # the call's first lines
            call = text[match.start():match.start() + 300].split("\n\n")[0]
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"^\s*(import pickle|from pickle|import dill)", text, re.M), path
