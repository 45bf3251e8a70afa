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
