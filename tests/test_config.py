"""Preset validation: everything wrong is reported before any model loads, in one line."""

from pathlib import Path

import pytest

from sipo_plugin.training.config import (SECTIONS, ConfigError, _key_index, describe_keys,
                                         load_config)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "preset.toml"
    path.write_text(text)
    return path


@pytest.fixture
def manifest(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("")
    return path


def base_preset(manifest) -> str:
    return f'[data]\ntrain_data = "{manifest}"\n[model]\npretrained_model_name_or_path = "toy"\n'


def test_every_bundled_preset_validates(manifest):
    presets = sorted((ROOT / "presets").glob("*.toml"))
    assert len(presets) >= 10, "presets missing"
    for preset in presets:
        # the real-model presets carry placeholder paths: any existing path passes validation
        placeholders = "/path/to/" in preset.read_text()
        overrides = ["--pretrained_model_name_or_path", str(ROOT), "--train_data",
                     str(manifest)] if placeholders else []
        if placeholders and "online_prompts" in preset.read_text():  # (the online presets')
            overrides += ["--online_prompts", str(manifest)]
        config = load_config(preset, overrides)
        assert config.source == str(preset)


def test_unknown_key_suggests_the_closest(tmp_path, manifest):
    preset = write(tmp_path, base_preset(manifest) + "[training]\nlearnig_rate = 1e-4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'learnig_rate' in \[training\].*'learning_rate'"):
        load_config(preset)


def test_key_in_the_wrong_section_names_its_section(tmp_path, manifest):
    preset = write(tmp_path, base_preset(manifest) + "[network]\nlearning_rate = 1e-4\n")
    with pytest.raises(ConfigError, match=r"belongs in \[training\]"):
        load_config(preset)


def test_unknown_section(tmp_path, manifest):
    preset = write(tmp_path, base_preset(manifest) + "[trainig]\nseed = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trainig\].*'training'"):
        load_config(preset)


def test_wrong_type(tmp_path, manifest):
    preset = write(tmp_path, base_preset(manifest) + '[training]\nmax_train_steps = "many"\n')
    with pytest.raises(ConfigError, match="'max_train_steps' must be an integer, got 'many'"):
        load_config(preset)


def test_missing_data_path(tmp_path):
    preset = write(tmp_path, '[data]\ntrain_data = "nowhere/pairs.jsonl"\n')
    with pytest.raises(ConfigError, match="train_data not found: nowhere/pairs.jsonl"):
        load_config(preset)


def test_missing_model_path(tmp_path, manifest):
    preset = write(tmp_path, f'[data]\ntrain_data = "{manifest}"\n'
                   '[model]\npretrained_model_name_or_path = "no/such/model"\n')
    with pytest.raises(ConfigError, match="model not found: no/such/model"):
        load_config(preset)


def test_broken_toml_names_the_file(tmp_path):
    preset = write(tmp_path, "[training\nseed = 1\n")
    with pytest.raises(ConfigError, match=f"{preset}: not valid TOML"):
        load_config(preset)


def test_unknown_objective_and_hyperparameter(tmp_path, manifest):
    preset = write(tmp_path, base_preset(manifest) + '[objective]\nname = "sipoo"\n')
    with pytest.raises(ConfigError, match="sipo"):
        load_config(preset)
    preset = write(tmp_path, base_preset(manifest) + '[objective]\nname = "sipo"\nbetta = 10.0\n')
    with pytest.raises(ConfigError, match="beta"):
        load_config(preset)


def test_overrides_bare_qualified_and_objective(tmp_path, manifest):
    preset = write(tmp_path, base_preset(manifest))
    config = load_config(preset, ["--learning_rate", "5e-5", "--training.max_train_steps", "7",
                                  "--objective", "dpo-cm", "--beta", "2500",
                                  "--network_target_modules", '["to_q", "to_v"]',
                                  "--output_dir", "some/dir", "--train_text_encoder", "true"])
    assert config.training.learning_rate == 5e-5
    assert config.training.max_train_steps == 7
    assert config.training.output_dir == "some/dir"
    assert config.objective.name == "dpo-cm"
    assert config.objective.hyperparameters == {"beta": 2500}
    assert config.network.network_target_modules == ["to_q", "to_v"]
    assert config.network.train_text_encoder is True


def test_unknown_override_suggests(tmp_path, manifest):
    preset = write(tmp_path, base_preset(manifest))
    with pytest.raises(ConfigError, match="unknown option '--max_train_step'.*'max_train_steps'"):
        load_config(preset, ["--max_train_step", "3"])


def test_bad_choice_and_range(tmp_path, manifest):
    preset = write(tmp_path, base_preset(manifest))
    with pytest.raises(ConfigError, match="'mixed_precision' must be one of no, fp16, bf16"):
        load_config(preset, ["--mixed_precision", "fp8"])
    with pytest.raises(ConfigError, match="'train_batch_size' must be > 0"):
        load_config(preset, ["--train_batch_size", "0"])


def test_keys_are_unique_across_sections_and_documented():
    seen = {}
    for section, key, _default, help_text in describe_keys():
        assert help_text, f"[{section}] {key} has no help text"
        assert key not in seen or key == "name", f"'{key}' in [{section}] and [{seen[key]}]"
        seen[key] = section
    assert set(_key_index().values()) <= set(SECTIONS)


@pytest.mark.parametrize("preset", sorted((ROOT / "presets").glob("sd15_*.toml")), ids=lambda p: p.name)
def test_sd15_presets_validate_once_paths_are_filled_in(preset, tmp_path, manifest):
    model = tmp_path / "sd15"
    model.mkdir()
    with pytest.raises(ConfigError, match="not found"):  # the placeholders are reported
        load_config(preset)
    config = load_config(preset, ["--pretrained_model_name_or_path", str(model),
                                  "--train_data", str(manifest)])
    assert config.objective.name in preset.stem.replace("_", "-")
    assert config.data.resolution == 512


def test_switching_objective_on_the_command_line_drops_the_presets_foreign_keys(tmp_path, manifest, capsys):
    preset = write(tmp_path, base_preset(manifest) + '[objective]\nname = "sipo"\nbeta = 100.0\n'
                   'kappa = "auto"\npair_weight = "shared_max"\n')
    config = load_config(preset, ["--objective", "diffusion-dpo"])
    assert config.objective.hyperparameters == {"beta": 100.0}
    assert "does not take the preset's kappa, pair_weight" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="kappa"):  # asked for on the command line: still an error
        load_config(preset, ["--objective", "diffusion-dpo", "--kappa", "2.0"])
    config = load_config(preset)  # the preset alone keeps everything
    assert config.objective.hyperparameters["pair_weight"] == "shared_max"


# ---------------------------------------------------------------------------------------------
# Schema and parsing vs the start-up checks (issue 13)

PARSE_ONLY = """
import json, os, sys
from sipo_plugin.training.config import parse_config
parse_config(None)  # the first call loads the objective registry's modules
touched = []
sys.addaudithook(lambda event, args: touched.append(str(args[0])) if event == "open" else None)
real_stat = os.stat
os.stat = lambda path, *a, **k: touched.append(str(path)) or real_stat(path, *a, **k)
config = parse_config(sys.argv[1], sys.argv[2:])
os.stat = real_stat
roots = [os.path.abspath(p or os.curdir) for p in sys.path]  # imports and installed plugins' metadata
touched = {t for t in touched if t and not any(os.path.abspath(t).startswith(r) for r in roots)}
print(json.dumps({"touched": sorted(touched),
                  "heavy": [m for m in ("torch", "diffusers", "transformers") if m in sys.modules],
                  "model": config.model.pretrained_model_name_or_path}))
"""


def test_building_a_config_checks_nothing_imports_no_torch_and_reads_only_the_preset(tmp_path):
    """Parsing type-checks, nothing more: a preset naming missing files, an absent device and a
    bad frame count parses (reading the preset and nothing else, without torch); the start-up
    checks then name each problem."""
    import json
    import subprocess
    import sys

    from sipo_plugin.training.checks import check_config
    from sipo_plugin.training.config import parse_config
    preset = write(tmp_path, '[model]\nfamily = "cogvideox"\n'
                             'pretrained_model_name_or_path = "/nowhere/model"\n'
                             '[data]\ntrain_data = "/nowhere/pairs.jsonl"\nnum_frames = 8\n'
                             '[training]\nreference = "frozen_copy"\nreference_device = "cuda:7"\n'
                             'max_train_steps = 0\n[export]\nlora_format = "diffusers"\n')
    out = subprocess.run([sys.executable, "-c", PARSE_ONLY, str(preset)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"touched": [str(preset)], "heavy": [], "model": "/nowhere/model"}, out.stderr
    with pytest.raises(ConfigError) as info:
        check_config(parse_config(preset))
    text = "\n".join(info.value.problems)
    for expected in ("'max_train_steps' must be > 0", "num_frames must be 4k+1 (e.g. 5 or 9)",
                     "model not found: /nowhere/model", "train_data not found",
                     "'reference_device' = 'cuda:7'"):
        assert expected in text, expected
    assert info.value.config.model.family == "cogvideox"  # what --check reads further


def test_each_entry_point_runs_the_checks_once(monkeypatch, capsys):
    """load_config (library use, train, --analyze, --evaluate) and --check run the settings'
    rules exactly once; a config copied with dataclasses.replace is not checked again."""
    import dataclasses

    import train_sipo
    from sipo_plugin.training import checks
    calls = []
    real = checks.config_problems
    monkeypatch.setattr(checks, "config_problems", lambda config: calls.append(1) or real(config))
    config = load_config(ROOT / "presets/demo.toml")
    dataclasses.replace(config, training=dataclasses.replace(config.training, max_train_steps=0))
    assert len(calls) == 1
    assert train_sipo.main(["--preset", str(ROOT / "presets/demo.toml"), "--check"]) == 0
    assert len(calls) == 2
    assert train_sipo.main(["--preset", str(ROOT / "presets/demo.toml"), "--check",
                            "--max_train_steps", "0"]) == 2
    assert len(calls) == 3 and "'max_train_steps' must be > 0" in capsys.readouterr().err


def test_family_rules_come_from_the_family_declaration(monkeypatch, manifest):
    """The video frame rule, the LoRA formats and text-encoder training are read from
    models.families: a family declared with frame_step 8 asks for 8k+1 frames."""
    from sipo_plugin.models import families
    overrides = ["--family", "cogvideox", "--pretrained_model_name_or_path", str(ROOT),
                 "--train_data", str(manifest), "--lora_format", "diffusers", "--num_frames", "13"]
    assert load_config(None, overrides).data.num_frames == 13  # 4k+1
    eight = dataclasses_replace(families.FAMILIES["cogvideox"], frame_step=8,
                                lora_formats=("kohya",))
    monkeypatch.setitem(families.FAMILIES, "cogvideox", eight)
    with pytest.raises(ConfigError, match=r"num_frames must be 8k\+1 \(e\.g\. 9 or 17\), got 13"):
        load_config(None, [*overrides, "--lora_format", "kohya"])
    with pytest.raises(ConfigError) as info:
        load_config(None, [*overrides, "--train_text_encoder", "true"])
    text = "\n".join(info.value.problems)
    assert "'lora_format' must be one of kohya, got 'diffusers'" in text
    assert "train_text_encoder is not supported for CogVideoX (the T5 encoder" in text


def dataclasses_replace(obj, **changes):
    import dataclasses
    return dataclasses.replace(obj, **changes)


def three_prompts() -> list[str]:
    return ["a", "b", "c"]


def test_the_toy_reaches_the_config_only_through_registries(manifest):
    """'toy' is a registered model (its folder, its family, its eval.json extras) and a registered
    prompt set; a prompt set registered by another package is accepted the same way."""
    from sipo_plugin.models.families import named_model
    from sipo_plugin.pairs.prompts import read_prompts, register_prompt_set
    toy = named_model("toy")
    assert toy.family == "sd15" and (toy.folder / "model_index.json").is_file()
    assert toy.evaluation_stats is not None and named_model("/some/path") is None
    assert len(read_prompts("toy")) == 54
    register_prompt_set("three-prompts", three_prompts)
    assert [e.prompt for e in read_prompts("three-prompts")] == ["a", "b", "c"]
    config = load_config(None, ["--train_data", str(manifest.with_suffix(".new.jsonl")),
                                "--pairs_prompts", "three-prompts", "--rewards", '["colour"]'])
    assert config.pairs.pairs_prompts == "three-prompts"
    with pytest.raises(ConfigError, match="pairs_prompts = 'four-prompts': prompt file not found"):
        load_config(None, ["--train_data", str(manifest), "--pairs_prompts", "four-prompts",
                           "--rewards", '["colour"]'])


def test_sections_on_their_own_are_type_checked_and_the_family_known(tmp_path):
    """`sipo-pairs sample --preset`: [model], [sampling], [training] without the run's rules (no
    pair data yet), the family checked by the same rule as a run's."""
    from sipo_plugin.training.config import load_sections
    preset = write(tmp_path, '[model]\nfamily = "sd16"\n[data]\ntrain_data = "/nowhere"\n')
    with pytest.raises(ConfigError, match=r"unknown model family 'sd16'.*did you mean 'sd15'"):
        load_sections(preset, ("model", "sampling"))
    preset.write_text('[model]\nfamily = "sdxl"\n[data]\ntrain_data = "/nowhere"\n')
    assert load_sections(preset, ("model", "sampling"))["model"].family == "sdxl"
