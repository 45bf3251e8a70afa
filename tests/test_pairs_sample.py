"""`sipo-pairs sample`: candidates from a tiny SD1.5 model saved to disk: records, seeds, latents,
batch independence, resume after a kill, a LoRA on top, bad prompt files."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sipo_plugin.pairs import sample as sample_module
from sipo_plugin.pairs.candidates import CANDIDATES_FILE, read_candidates
from sipo_plugin.pairs.cli import main
from tiny_models import tiny_sd15_pipeline


@pytest.fixture(scope="module")
def sd15_preset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    tiny_sd15_pipeline(0).save_pretrained(root / "model")
    preset = root / "preset.toml"
    preset.write_text(f'[model]\nfamily = "sd15"\npretrained_model_name_or_path = "{root / "model"}"\n'
                      '[data]\ntrain_data = "/nowhere/pairs.jsonl"\n'
                      '[sampling]\nsampler_steps = 3\nguidance_scale = 2.0\n')
    return preset


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text('{"prompt": "a red circle"}\n\n{"prompt": "a blue square", '
                    '"negative_prompt": "green"}\n')
    return path


def _sample(preset, prompts, out, *extra):
    return main(["sample", "--preset", str(preset), "--prompts", str(prompts), "--out", str(out),
                 "--candidates", "2", *extra])


def test_records_images_latents_and_seeds(sd15_preset, prompts, tmp_path):
    assert _sample(sd15_preset, prompts, tmp_path / "c", "--batch_size", "3") == 0
    records = read_candidates(tmp_path / "c")
    assert [r.id for r in records] == ["p00000-c00", "p00000-c01", "p00001-c00", "p00001-c01"]
    assert len({r.seed for r in records}) == 4
    assert records[2].negative_prompt == "green" and records[0].negative_prompt == ""
    assert records[0].settings["sampler"] == "ddim" and records[0].settings["steps"] == 3
    assert records[0].settings["guidance_scale"] == 2.0  # the preset's [sampling]
    assert records[0].model["family"] == "sd15" and records[0].model["network_weights"] is None
    for r in records:
        assert (tmp_path / "c" / r.path).is_file()
        latents = load_file(tmp_path / "c" / r.latents)["latents"]
        assert latents.shape == (4, 8, 8)  # the tiny model's native latent size
    # the same candidate drawn alone (batch 1) is the same sample: its seed alone decides it
    assert _sample(sd15_preset, prompts, tmp_path / "one", "--batch_size", "1") == 0
    for a, b in zip(records, read_candidates(tmp_path / "one")):
        assert a.seed == b.seed
        torch.testing.assert_close(load_file(tmp_path / "c" / a.latents)["latents"],
                                   load_file(tmp_path / "one" / b.latents)["latents"],
                                   rtol=1e-4, atol=1e-4)


def test_resume_samples_only_what_is_missing(sd15_preset, prompts, tmp_path, monkeypatch):
    out = tmp_path / "c"
    assert _sample(sd15_preset, prompts, out) == 0
    first = load_file(out / "latents" / "p00001-c01.safetensors")["latents"]
    lines = (out / CANDIDATES_FILE).read_text().splitlines(keepends=True)
    (out / CANDIDATES_FILE).write_text("".join(lines[:-1]) + lines[-1][:20])  # killed mid-line
    drawn = []
    real = sample_module.generate

    def counting(pipe, adapter, settings, prompts, seeds, negatives=None):
        drawn.extend(seeds)
        return real(pipe, adapter, settings, prompts, seeds, negatives)

    monkeypatch.setattr(sample_module, "generate", counting)
    assert _sample(sd15_preset, prompts, out) == 0
    records = read_candidates(out)
    assert len(records) == 4 and drawn == [records[-1].seed]  # only the unrecorded one
    torch.testing.assert_close(load_file(out / records[-1].latents)["latents"], first, rtol=1e-4,
                               atol=1e-4)  # drawn alone now, in a batch of 4 before
    drawn.clear()
    assert _sample(sd15_preset, prompts, out) == 0 and drawn == []  # all done: nothing sampled
    # resuming with other settings would mix two runs in one folder
    assert _sample(sd15_preset, prompts, out, "--sample_steps", "4") == 2


def test_a_lora_on_top_changes_the_samples_and_is_recorded(sd15_preset, prompts, tmp_path):
    from sipo_plugin.models import get_model_adapter
    from sipo_plugin.training.config import load_sections
    from sipo_plugin.training.config import NetworkConfig
    model_cfg = load_sections(sd15_preset, ("model",))["model"]
    adapter = get_model_adapter("sd15").load(model_cfg, device=torch.device("cpu"))
    for p in adapter.add_lora(NetworkConfig(network_dim=4, network_alpha=4.0)):
        torch.nn.init.normal_(p, std=0.5)
    lora = tmp_path / "lora.safetensors"
    adapter.export_lora(lora, lora_format="kohya", network_alpha=4.0, metadata={})
    assert _sample(sd15_preset, prompts, tmp_path / "base", "--candidates", "1") == 0
    assert _sample(sd15_preset, prompts, tmp_path / "lora", "--candidates", "1",
                   "--network_weights", str(lora)) == 0
    base, tuned = read_candidates(tmp_path / "base")[0], read_candidates(tmp_path / "lora")[0]
    assert base.seed == tuned.seed
    assert tuned.model["network_weights"] == str(lora) and len(tuned.model["network_sha256"]) == 64
    diff = (load_file(tmp_path / "base" / base.latents)["latents"]
            - load_file(tmp_path / "lora" / tuned.latents)["latents"]).abs().max()
    assert diff > 1e-3


@pytest.mark.parametrize("content, message", [(b"", "no prompts"), (b"\n\n", "no prompts"),
                                              (b"caf\xe9\n", "not UTF-8"),
                                              (b'{"prompt": 3}\n', ":1: needs a non-empty")])
def test_bad_prompt_files_are_one_line_naming_the_file(sd15_preset, tmp_path, capsys, content,
                                                       message):
    bad = tmp_path / ("p.jsonl" if content.startswith(b"{") else "p.txt")
    bad.write_bytes(content)
    assert _sample(sd15_preset, bad, tmp_path / "c") == 2
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and str(bad) in out and message in out
    assert not (tmp_path / "c" / CANDIDATES_FILE).exists()
