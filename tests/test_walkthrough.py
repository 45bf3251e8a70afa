"""The README walkthrough end to end, one command each: sample -> score -> make -> train ->
evaluate, on tiny SD1.5 and SDXL models saved to disk with a tiny random CLIP in PickScore's
layout as the reward, and on a tiny Wan model with the reward averaged over each clip's frames.
Training reads the candidates' saved latents: the VAE never encodes an image."""

import json
from pathlib import Path

import pytest
from PIL import Image

import train_sipo
from sipo_plugin.pairs.candidates import read_candidates
from sipo_plugin.pairs.cli import main as pairs_main
from tiny_rewards import save_tiny_pickscore

PROMPTS = ["a red circle", "a blue square", "a green cat"]


def _preset(folder: Path, family: str, model: Path, data: str, extra: str = "") -> Path:
    preset = folder / "preset.toml"
    preset.write_text(
        f'[model]\nfamily = "{family}"\npretrained_model_name_or_path = "{model}"\n'
        f'[data]\ntrain_data = "{folder / "pairs.jsonl"}"\n{data}\n'
        f'[network]\nnetwork_dim = 4\nnetwork_alpha = 4\n'
        f'[training]\noutput_dir = "{folder / "run"}"\nmax_train_steps = 2\ntrain_batch_size = 1\n'
        'learning_rate = 1e-3\ncalibration_pairs = 1\nlogging_steps = 1\n'
        f'[sampling]\nsampler_steps = 2\n{extra}\n'
        f'[evaluate]\neval_after_training = true\neval_prompts = "{folder / "prompts.txt"}"\n'
        f'eval_samples = 3\neval_rewards = ["pickscore={folder / "pickscore"}"]\n')
    return preset


def walkthrough(folder: Path, preset: Path, monkeypatch, adapter_cls, capsys) -> dict:
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    save_tiny_pickscore(folder / "pickscore")
    cands = folder / "cands"
    assert pairs_main(["sample", "--preset", str(preset), "--prompts", str(folder / "prompts.txt"),
                       "--out", str(cands), "--candidates", "3"]) == 0
    assert pairs_main(["score", "--candidates", str(cands), "--reward",
                       f"pickscore={folder / 'pickscore'}"]) == 0
    assert pairs_main(["make", "--candidates", str(cands), "--out",
                       str(folder / "pairs.jsonl")]) == 0
    rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) <= len(PROMPTS) and all("chosen_latents" in row for row in rows)

    def no_vae(*args, **kwargs):
        raise AssertionError("the VAE encoded an image: the saved latents were not used")

    monkeypatch.setattr(adapter_cls, "encode_images", no_vae)
    capsys.readouterr()
    assert train_sipo.main(["--preset", str(preset)]) == 0
    assert "saved latents of" in capsys.readouterr().out
    stats = json.loads((folder / "run" / "eval.json").read_text())
    assert set(stats["rewards"]) == {"pickscore"} and stats["n_samples"] == 3
    assert (folder / "run" / "samples_before_after.png").is_file()
    # --evaluate alone: the exported LoRA on the base model, the same seeds, the same numbers
    (folder / "run" / "eval.json").unlink()
    lora = next(p for p in (folder / "run").iterdir() if p.suffix == ".safetensors")
    assert train_sipo.main(["--preset", str(preset), "--evaluate",
                            "--eval_network_weights", str(lora)]) == 0
    again = json.loads((folder / "run" / "eval.json").read_text())
    assert again["base_reward"] == pytest.approx(stats["base_reward"], abs=1e-4)
    assert again["tuned_reward"] == pytest.approx(stats["tuned_reward"], abs=2e-3)
    return stats


def _image_size(folder: Path) -> int:
    first = read_candidates(folder / "cands")[0]
    return Image.open(folder / "cands" / first.path).size[0]


@pytest.mark.slow
def test_sd15_walkthrough(tmp_path, monkeypatch, capsys):
    from sipo_plugin.models.sd15 import SD15Adapter
    from tiny_models import tiny_sd15_pipeline
    tiny_sd15_pipeline(0).save_pretrained(tmp_path / "model")
    size = tiny_sd15_pipeline(0).unet.config.sample_size * 2 ** 1  # the tiny VAE's factor
    preset = _preset(tmp_path, "sd15", tmp_path / "model", f"resolution = {size}")
    walkthrough(tmp_path, preset, monkeypatch, SD15Adapter, capsys)
    assert _image_size(tmp_path) == size


@pytest.mark.slow
def test_sdxl_walkthrough(tmp_path, monkeypatch, capsys):
    from sipo_plugin.models.sdxl import SDXLAdapter
    from tiny_sdxl import save_tiny_sdxl
    save_tiny_sdxl(tmp_path / "model")
    preset = _preset(tmp_path, "sdxl", tmp_path / "model", "resolution = 32",
                     "width = 32\nheight = 32")
    walkthrough(tmp_path, preset, monkeypatch, SDXLAdapter, capsys)


@pytest.mark.slow
def test_wan_walkthrough_with_a_frame_averaged_reward(tmp_path, monkeypatch, capsys):
    from sipo_plugin.models.wan import WanAdapter
    from tiny_wan import save_tiny_wan
    save_tiny_wan(tmp_path / "model")
    preset = _preset(tmp_path, "wan", tmp_path / "model",
                     "num_frames = 5\nvideo_height = 32\nvideo_width = 32",
                     "width = 32\nheight = 32\nsample_frames = 5")
    preset.write_text(preset.read_text() + '[export]\nlora_format = "wan"\n')
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    save_tiny_pickscore(tmp_path / "pickscore")
    cands = tmp_path / "cands"
    assert pairs_main(["sample", "--preset", str(preset), "--prompts", str(tmp_path / "prompts.txt"),
                       "--out", str(cands), "--candidates", "2"]) == 0
    records = read_candidates(cands)
    assert all(r.path.endswith(".gif") for r in records)
    assert Image.open(cands / records[0].path).n_frames == 5
    assert pairs_main(["score", "--candidates", str(cands), "--frame_stride", "2", "--reward",
                       f"pickscore={tmp_path / 'pickscore'}"]) == 0
    assert pairs_main(["make", "--candidates", str(cands), "--out",
                       str(tmp_path / "pairs.jsonl")]) == 0
    capsys.readouterr()
    assert train_sipo.main(["--preset", str(preset)]) == 0
    assert "video pairs encode their clips" in capsys.readouterr().out
    stats = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert stats["rewards"]["pickscore"]["n_samples"] == 3
