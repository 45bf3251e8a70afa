"""sd-scripts habits: --config_file (sections cosmetic, keys mapped, command line wins), the
command line's spellings (bare flags, --key=value, --sdpa, --network_module), --output_config, and
sd-scripts dataset configs over pair folders; every bad input is one line naming file and key."""

import json
from pathlib import Path

import pytest
from PIL import Image

import train_sipo
from sipo_plugin.data import read_pairs
from sipo_plugin.data.errors import PairDataError
from sipo_plugin.sdscripts.config_file import flatten_config, parse_key_values
from sipo_plugin.sdscripts.dataset_config import read_dataset_config
from sipo_plugin.training.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def pair_folder(root: Path, names, caption_extension: str = ".txt", size=(32, 32)) -> Path:
    """w/NAME.png (+ caption) and l/NAME.png for each name."""
    for side in ("w", "l"):
        (root / side).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (200, 10 * i, 0)).save(root / "w" / f"{name}.png")
        Image.new("RGB", size, (10 * i, 0, 200)).save(root / "l" / f"{name}.png")
        (root / "w" / f"{name}{caption_extension}").write_text(f"caption of {name}\n")
    return root


def test_sections_are_cosmetic_and_later_tables_win():
    raw = {"seed": 1, "model_arguments": {"network_dim": 8, "seed": 2},
           "training_arguments": {"network_dim": 16}, "objective": {"name": "dpo-cm"}}
    assert flatten_config(raw) == {"seed": 2, "network_dim": 16, "objective": "dpo-cm"}
    run_toml = {"run": {"id": "0123456789abcdef", "started": "2026"}, "training": {"seed": 3}}
    assert flatten_config(run_toml) == {"seed": 3}  # a run.toml's [run] is not a setting


def test_config_file_maps_sd_scripts_keys_and_the_command_line_wins(tmp_path, manifest, capsys):
    config_file = write(tmp_path / "cfg.toml", f"""
[model_arguments]
pretrained_model_name_or_path = "toy"
[dataset_arguments]
train_data_dir = "{manifest}"
resolution = "64,64"
max_data_loader_n_workers = 1
[training_arguments]
optimizer_type = "adafactor"
unet_lr = 3e-4
text_encoder_lr = 5e-5
network_train_unet_only = true
max_train_epochs = 2
learning_rate = 1e-3
noise_offset = 0.1
min_snr_gamma = 0
sdpa = true
network_module = "networks.lora"
""")
    config = load_config(None, ["--learning_rate=2e-4", "--gradient_checkpointing"],
                         config_file=config_file)
    t, n, d = config.training, config.network, config.data
    assert (t.learning_rate, t.unet_lr, t.text_encoder_lr) == (2e-4, 3e-4, 5e-5)
    assert t.optimizer_type == "Adafactor" and t.max_train_epochs == 2 and t.gradient_checkpointing
    assert d.resolution == 64 and d.dataloader_num_workers == 1 and d.train_data == str(manifest)
    assert n.train_text_encoder is False  # network_train_unet_only
    # sd-scripts' defaults where the file is silent: rank 4, alpha 1, its LoRA targets
    assert (n.network_dim, n.network_alpha) == (4, 1.0) and "ff.net.2" in n.network_target_modules
    lines = [line for line in capsys.readouterr().out.splitlines() if "not used here" in line]
    assert len(lines) == 1 and "noise_offset" in lines[0]
    assert "min_snr_gamma" not in lines[0]  # 0 asks for nothing


def test_torch_compile_maps_to_compile(tmp_path, manifest, capsys):
    config_file = write(tmp_path / "cfg.toml", f'train_data_dir = "{manifest}"\ntorch_compile = true\n')
    assert load_config(None, [], config_file=config_file).training.compile is True
    assert load_config(None, ["--train_data", str(manifest), "--torch_compile"]).training.compile
    assert "torch_compile" not in capsys.readouterr().out  # used, so not in "not used here"


def test_sd_scripts_defaults_do_not_override_the_preset(tmp_path, manifest):
    preset = write(tmp_path / "p.toml", "[network]\nnetwork_dim = 16\n")
    config_file = write(tmp_path / "c.toml", f'train_data_dir = "{manifest}"\n')
    config = load_config(preset, [], config_file=config_file)
    assert config.network.network_dim == 16 and config.network.network_alpha == 1.0


@pytest.mark.parametrize("line, expected", [
    ('learning_rate = "1e-4"', r"c\.toml: 'learning_rate' must be a finite number, got '1e-4'"),
    ('network_module = "lycoris.kohya"', r"c\.toml: network_module = 'lycoris.kohya' is not trained"),
    ('resolution = "512,768"', r"c\.toml: 'resolution' = '512,768': training sizes are square"),
    ('optimizer_args = "weight_decay"', r"c\.toml: 'optimizer_args' must be a list"),
    ("unet_lr = 0", r"c\.toml: unet_lr = 0 trains no U-Net"),
])
def test_bad_config_file_values_are_one_line_naming_file_and_key(tmp_path, manifest, line, expected):
    config_file = write(tmp_path / "c.toml", f'train_data_dir = "{manifest}"\n{line}\n')
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(None, [], config_file=config_file)
    assert "\n" not in str(err.value)


def test_command_line_spellings(manifest, capsys):
    base = ["--train_data", str(manifest)]
    config = load_config(None, [*base, "--cache_latents", "--max_train_steps=6", "--sdpa",
                                "--network_module", "networks.lora", "--xformers",
                                "--resolution=256,256", "--lowram"])
    assert config.data.cache_latents and config.training.xformers
    assert config.training.max_train_steps == 6 and config.data.resolution == 256
    assert "--lowram" in capsys.readouterr().out
    for argv, message in ((["--network_module", "lycoris.kohya"], "only networks.lora"),
                          (["--resolution"], "'--resolution' needs a value"),
                          (["--noise_ofset", "0.1"], "did you mean 'noise_offset'")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, *argv])


def test_cli_bare_flag_and_equals_through_main(manifest, capsys):
    code = train_sipo.main(["--check", "--train_data", str(manifest), "--cache_latents",
                            "--max_train_steps=6", "--gradient_checkpointing"])
    out = capsys.readouterr().out
    resolved = json.loads(out[out.index("{"):])
    assert code == 0
    assert resolved["data"]["cache_latents"] is True
    assert resolved["training"]["max_train_steps"] == 6
    assert resolved["training"]["gradient_checkpointing"] is True


def test_output_config_round_trips_through_preset_and_config_file(tmp_path, manifest, capsys):
    out = tmp_path / "resolved.toml"
    argv = ["--preset", str(ROOT / "presets/demo.toml"), "--train_data", str(manifest),
            "--unet_lr", "3e-4", "--objective", "dpo-cm", "--cache_latents"]
    assert train_sipo.main([*argv, "--output_config", str(out)]) == 0
    expected = load_config(ROOT / "presets/demo.toml", argv[2:]).to_dict()
    assert load_config(out).to_dict() == expected
    assert load_config(None, config_file=out).to_dict() == expected
    assert train_sipo.main([*argv, "--output_config", str(out)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    # bare, as sd-scripts: written to the --config_file path
    target = tmp_path / "sd.toml"
    assert train_sipo.main([*argv, "--config_file", str(target), "--output_config"]) == 0
    assert load_config(target).to_dict() == expected


def test_dataset_config_subsets_with_repeats_and_their_caption_extensions(tmp_path, manifest):
    a = pair_folder(tmp_path / "a", ["x", "y"])
    b = pair_folder(tmp_path / "b", ["z"], caption_extension=".caption")
    dataset = write(tmp_path / "dataset.toml", f"""
[general]
shuffle_caption = true
caption_extension = ".txt"
resolution = 64
[[datasets]]
batch_size = 3
enable_bucket = true
min_bucket_reso = 32
bucket_reso_steps = 32
  [[datasets.subsets]]
  image_dir = "{a}"
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = "{b}"
  caption_extension = ".caption"
  [[datasets.subsets]]
  image_dir = "{a}"
  is_reg = true
""")
    records = read_pairs(dataset)
    assert [r.prompt for r in records] == ["caption of x", "caption of y"] * 2 + ["caption of z"]
    config = load_config(None, ["--dataset_config", str(dataset), "--resolution", "512"])
    assert config.data.train_data == str(dataset)
    # as in sd-scripts, the dataset config's values come first
    assert (config.data.resolution, config.training.train_batch_size) == (64, 3)
    assert (config.data.enable_bucket, config.data.min_bucket_reso) == (True, 32)
    assert read_dataset_config(dataset).unused == ("is_reg", "shuffle_caption")


@pytest.mark.parametrize("body, expected", [
    ('image_dir = "{empty}"', r"datasets\[0\]\.subsets\[0\]\.image_dir = '.*': not a pair folder"),
    ('image_dir = "{missing}"', r"datasets\[0\]\.subsets\[0\]\.image_dir = '.*': not found"),
    ('image_dir = "{pairs}"\nnum_repeats = "3"',
     r"datasets\[0\]\.subsets\[0\]\.num_repeats must be an integer, got '3'"),
    ('image_dir = "{pairs}"\nflip_aug = 1', r"subsets\[0\]\.flip_aug must be true or false"),
    ('image_dir = "{pairs}"\nmetadata_file = "m.json"', r"metadata_file: fine-tuning"),
    ('image_dir = "{pairs}"\nimage_dri = "x"', r"unknown key 'image_dri'"),
])
def test_bad_dataset_config_is_one_line_naming_file_and_key(tmp_path, body, expected):
    (tmp_path / "empty").mkdir()
    pairs = pair_folder(tmp_path / "pairs", ["x"])
    text = "[[datasets]]\n  [[datasets.subsets]]\n  " + body.format(
        empty=tmp_path / "empty", missing=tmp_path / "nope", pairs=pairs)
    dataset = write(tmp_path / "d.toml", text)
    with pytest.raises(ConfigError, match=r"d\.toml: .*" + expected) as err:
        load_config(None, ["--dataset_config", str(dataset)])
    assert "\n" not in str(err.value)
    with pytest.raises(PairDataError, match=expected):
        read_pairs(dataset)


def test_dataset_settings_must_agree_across_datasets(tmp_path):
    pairs = pair_folder(tmp_path / "pairs", ["x"])
    dataset = write(tmp_path / "d.toml", "".join(
        f'[[datasets]]\nresolution = {r}\n  [[datasets.subsets]]\n  image_dir = "{pairs}"\n'
        for r in (512, 768)))
    with pytest.raises(ConfigError, match=r"'resolution' differs between datasets\[0\] \(512\) "
                                          r"and datasets\[1\] \(768\)"):
        load_config(None, ["--dataset_config", str(dataset)])


def test_optimizer_args_are_python_literals():
    assert parse_key_values(["betas=0.9,0.99", "decouple=True", "d_coef=2", "mode=fast"],
                            "optimizer_args", "x") == {"betas": (0.9, 0.99), "decouple": True,
                                                       "d_coef": 2, "mode": "fast"}


def test_refinement_keys_map_when_the_config_has_them():
    """clip_skip, save_precision, network_weights and LoCon's network_args conv_dim / conv_alpha
    pass on to settings of those names once they exist, and are listed as not used before."""
    from sipo_plugin.sdscripts.config_file import translate
    flat = {"network_args": ["conv_dim=4", "conv_alpha=2", "algo=locon"], "clip_skip": 2,
            "save_precision": "fp16", "network_weights": "style.safetensors"}
    mapped, unused = translate(flat, "f.toml", {"conv_dim", "conv_alpha", "clip_skip",
                                                "save_precision", "network_weights"})
    assert mapped == {"conv_dim": 4, "conv_alpha": 2, "clip_skip": 2, "save_precision": "fp16",
                      "network_weights": "style.safetensors"}
    assert unused == ["network_args algo"]
    mapped, unused = translate({**flat, "clip_skip": 1}, "f.toml", set())
    assert mapped == {}
    assert unused == ["network_args conv_dim", "network_args conv_alpha", "network_args algo",
                      "save_precision", "network_weights"]  # clip_skip 1 is sd-scripts' default
