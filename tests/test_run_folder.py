"""A run owns its output folder (run.toml, run ids, pruning only its own files), resume checks
what it resumes, and every save writes a LoRA file that diffusers loads."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

import train_sipo
from sipo_plugin.toy.pipeline import load_toy_pipeline
from sipo_plugin.training.checkpoint import (CheckpointError, list_checkpoints, load_checkpoint,
                                             prune_checkpoints)
from sipo_plugin.training.config import load_config
from sipo_plugin.training.loop import load_lora_state, train
from sipo_plugin.training.run_folder import (RunFolderError, folder_run_id, lora_run_id,
                                             prune_step_loras, step_loras)
from test_training import load_adapter, short_run

SAVE = ["--max_train_steps", "3", "--save_every_n_steps", "1", "--save_last_n", "2"]


def cli(manifest, out, *extra) -> list[str]:
    return ["--train_data", str(manifest), "--output_dir", str(out), "--resolution", "32",
            "--train_batch_size", "2", "--learning_rate", "1e-3", "--calibration_pairs", "4",
            *extra]


@pytest.fixture(scope="module")
def run_a(manifest, tmp_path_factory):
    """A 3-step run saving at every step, keeping 2: (output folder, result)."""
    out = tmp_path_factory.mktemp("run_a")
    return out, train(short_run(manifest, out, *SAVE))


def copy_of(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "run")
    return tmp_path / "run"


def test_run_toml_is_the_resolved_config_and_names_the_run(run_a):
    out, result = run_a
    run_id = folder_run_id(out)
    assert run_id == result.run_id and len(run_id) == 16
    # run.toml is a preset that gives back the same config
    saved = load_checkpoint(list_checkpoints(out)[-1])["config"]
    assert load_config(out / "run.toml").to_dict() == saved == result_config(out)
    assert [load_checkpoint(p)["run_id"] for p in list_checkpoints(out)] == [run_id, run_id]
    assert [lora_run_id(p) for p in step_loras(out, "sipo_lora", run_id)] == [run_id, run_id]


def result_config(out):
    """What the run was given (the short_run settings of the fixture), resolved."""
    manifest = load_checkpoint(list_checkpoints(out)[-1])["config"]["data"]["train_data"]
    return short_run(manifest, out, *SAVE).to_dict()


def test_every_save_writes_a_lora_file_kept_by_save_last_n(run_a):
    out, result = run_a
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    assert names == ["sipo_lora-000002.safetensors", "sipo_lora-000003.safetensors"]
    assert [p.name for p in list_checkpoints(out)] == ["step_0000002", "step_0000003"]
    with safe_open(str(out / "sipo_lora-000002.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "2" and meta["ss_output_name"] == "sipo_lora"


@torch.no_grad()
def unet_prediction(unet, text_encoder, tokenizer) -> torch.Tensor:
    ids = tokenizer(["a red circle"], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(5)
    c = unet.config
    x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g)
    return unet(x, torch.tensor([500]), text_encoder(ids)[0]).sample


def test_an_every_save_lora_loads_in_diffusers_with_the_models_predictions_at_that_step(
        run_a, manifest):
    out, result = run_a
    config = short_run(manifest, out, *SAVE)  # the run's network settings
    predictions = {}
    for step in (2, 3):
        adapter = load_adapter(config)
        adapter.add_trainable(config.network)
        load_lora_state(adapter, load_checkpoint(out / "checkpoints" / f"step_{step:07d}")["lora"])
        predictions[step] = unet_prediction(adapter.unet, adapter.text_encoder, adapter.tokenizer)
    pipe = load_toy_pipeline()
    base = unet_prediction(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    pipe.load_lora_weights(str(out / "sipo_lora-000002.safetensors"))
    loaded = unet_prediction(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert (loaded - base).abs().max() > 1e-4  # the LoRA changes the prediction
    assert (predictions[3] - predictions[2]).abs().max() > 1e-5  # step 2 is not step 3
    assert (loaded - predictions[2]).abs().max() <= 1e-5


def test_a_second_run_into_the_folder_stops_and_leaves_it_alone(run_a, manifest, tmp_path, capsys):
    out = copy_of(run_a[0], tmp_path)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    owner = folder_run_id(out)
    assert train_sipo.main(cli(manifest, out, *SAVE, "--learning_rate", "5e-4")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds another run's files" in err
    assert f"run {owner}" in err and "--resume latest" in err and "--overwrite" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_overwrite_replaces_the_other_run_and_resume_then_continues_the_new_one(run_a, manifest,
                                                                                tmp_path):
    out = copy_of(run_a[0], tmp_path)
    old = folder_run_id(out)
    assert train_sipo.main(cli(manifest, out, "--max_train_steps", "2", "--save_every_n_steps",
                               "1", "--overwrite")) == 0
    new = folder_run_id(out)
    assert new != old
    assert {load_checkpoint(p)["run_id"] for p in list_checkpoints(out)} == {new}
    assert not (out / "sipo_lora-000003.safetensors").exists()  # the old run's
    resumed = train(short_run(manifest, out, "--max_train_steps", "3", "--save_every_n_steps", "1",
                              "--resume", "latest"))
    assert resumed.run_id == new and resumed.steps == 3
    assert folder_run_id(out) == new


def test_a_run_stopped_before_its_first_save_does_not_block_the_same_command(manifest, tmp_path,
                                                                               capsys):
    """A crash before the first checkpoint leaves only run.toml and metrics.jsonl: running the
    command again trains (no --overwrite), and the stopped run's two files are kept renamed."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.toml").write_text('[run]\nid = "0123456789abcdef"\n', encoding="utf-8")
    (out / "metrics.jsonl").write_text('{"step": 0}\n', encoding="utf-8")
    assert train_sipo.main(cli(manifest, out, "--max_train_steps", "1")) == 0
    assert folder_run_id(out) not in (None, "0123456789abcdef")
    assert (out / "metrics.0123456789abcdef.jsonl").read_text(encoding="utf-8") == '{"step": 0}\n'
    assert "0123456789abcdef" in (out / "run.0123456789abcdef.toml").read_text(encoding="utf-8")
    assert "stopped before its first save" in capsys.readouterr().out


def test_pruning_deletes_only_this_runs_files(run_a, tmp_path):
    out = copy_of(run_a[0], tmp_path)
    mine = folder_run_id(out)
    # files of another run, e.g. copied in by hand: renamed copies carrying another id
    for step in (4, 5):
        folder = out / "checkpoints" / f"step_{step:07d}"
        shutil.copytree(out / "checkpoints" / "step_0000003", folder)
        state = json.loads((folder / "checkpoint.json").read_text())
        (folder / "checkpoint.json").write_text(json.dumps({**state, "run_id": "someone-else"}))
    assert prune_checkpoints(out, mine, 1) == [out / "checkpoints" / "step_0000002"]
    assert [p.name for p in list_checkpoints(out)] == ["step_0000003", "step_0000004", "step_0000005"]
    shutil.copy(out / "sipo_lora-000003.safetensors", out / "sipo_lora-000001.safetensors")
    prune_step_loras(out, "sipo_lora", mine, 1)
    assert sorted(p.name for p in out.glob("sipo_lora-*")) == ["sipo_lora-000003.safetensors"]
    # latest resumes this run's newest, never the other run's
    from sipo_plugin.training.checkpoint import resolve_resume
    assert resolve_resume("latest", out, mine).name == "step_0000003"


def test_a_legacy_folder_without_run_toml_is_another_runs(manifest, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunFolderError, match=r"metrics\.jsonl\): choose another --output_dir, "
                       "or pass --overwrite"):  # no checkpoint: resuming is not offered
        train(short_run(manifest, out, "--max_train_steps", "1"))


def test_resume_with_another_rank_names_each_setting_and_both_values(run_a, manifest, tmp_path,
                                                                    capsys):
    out = copy_of(run_a[0], tmp_path)
    argv = cli(manifest, out, *SAVE, "--resume", "latest", "--network_dim", "4",
               "--learning_rate", "5e-4", "--objective", "diffusion-dpo")
    assert train_sipo.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot resume" in err and "step_0000003" in err
    assert "network_dim = 8 (now 4)" in err and "learning_rate = 0.001 (now 0.0005)" in err
    assert "objective = 'sipo' (now 'diffusion-dpo')" in err


def test_resume_refuses_changed_data_and_applies_a_longer_run(run_a, manifest, tmp_path, capsys):
    from test_training import make_rendered_pairs
    out = copy_of(run_a[0], tmp_path)
    other = make_rendered_pairs(tmp_path / "other", n_pairs=6, seed=1)
    with pytest.raises(CheckpointError, match=r"the pair list of train_data = 8 pairs .*now 6 pairs"):
        train(short_run(other, out, *SAVE, "--resume", "latest"))
    result = train(short_run(manifest, out, "--max_train_steps", "4", "--save_every_n_steps", "1",
                             "--save_last_n", "2", "--resume", "latest"))
    assert result.steps == 4
    assert "max_train_steps = 3 (now 4)" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["lora", "foreign"])
def test_resume_of_a_lora_or_foreign_file_is_one_line(what, run_a, manifest, tmp_path, capsys):
    path = run_a[0] / "sipo_lora-000003.safetensors"
    if what == "foreign":
        path = tmp_path / "weights.safetensors"
        from safetensors.torch import save_file
        save_file({"w": torch.zeros(2)}, str(path))
    assert train_sipo.main(cli(manifest, tmp_path / "new", "--resume", str(path))) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ("a LoRA file, not a training checkpoint" if what == "lora"
            else "not a sipo-plugin checkpoint") in err


def test_analyze_of_a_checkpoint_with_another_rank_is_one_line(run_a, manifest, capsys):
    out = run_a[0]
    argv = ["--analyze", "--analysis-pairs", "2", *cli(manifest, out, "--resume", "latest",
                                                       "--network_dim", "4")]
    assert train_sipo.main(argv) == 1
    err = capsys.readouterr().err  # the model loads first: its progress bar comes before
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    assert "do not match this run's network settings" in err.strip().splitlines()[-1]
