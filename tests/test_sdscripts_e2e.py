"""Done-when of issue 12: a kohya_ss-GUI-style SD1.5 LoRA config with its sd-scripts dataset config
(tests/fixtures/sd_scripts/) runs here with only the model and data paths changed, and reports the
keys it does not use in one line. The command line shrinks the run to the tiny model's size
(resolution, buckets, steps), as an sd-scripts user overrides a config with flags."""

import re
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from tiny_models import tiny_sd15_pipeline

import train_sipo
from test_sdscripts_config import pair_folder

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sd_scripts"
GUI_ROOT = "/workspace/kohya_ss/dataset/my_style"


def localized(name: str, tmp_path: Path, model: Path) -> Path:
    """The fixture with its model and data paths pointed at tmp_path (nothing else changed)."""
    text = (FIXTURES / name).read_text()
    text = text.replace("runwayml/stable-diffusion-v1-5", str(model)).replace(GUI_ROOT, str(tmp_path))
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.slow
def test_kohya_gui_sd15_config_with_dataset_config_runs(tmp_path, capsys):
    model = tmp_path / "sd15"
    tiny_sd15_pipeline(0).save_pretrained(model)
    pair_folder(tmp_path / "pairs_a", ["a0", "a1"], size=(40, 32))
    pair_folder(tmp_path / "pairs_b", ["b0", "b1"], caption_extension=".caption")
    config_file = localized("kohya_gui_sd15_lora.toml", tmp_path, model)
    localized("dataset.toml", tmp_path, model)
    (tmp_path / "model").mkdir()
    shutil.copy(FIXTURES / "prompt.txt", tmp_path / "model" / "prompt.txt")  # the GUI writes it there

    code = train_sipo.main(["--config_file", str(config_file), "--resolution", "32",
                            "--min_bucket_reso", "32", "--max_bucket_reso", "64",
                            "--bucket_reso_steps", "32", "--max_train_steps", "2",
                            "--calibration_pairs", "1", "--objective", "diffusion-dpo"])
    out, err = capsys.readouterr()
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note: not used here")]
    assert len(notes) == 1
    unused = set(re.split(r", ", notes[0].split(": ", 2)[2]))
    assert {"noise_offset", "min_snr_gamma", "keep_tokens", "sample_sampler", "save_every_n_epochs",
            "bucket_no_upscale", "logging_dir", "epoch", "shuffle_caption (dataset_config)"} <= unused
    for honoured in ("learning_rate", "unet_lr", "text_encoder_lr", "network_dim", "optimizer_type",
                     "optimizer_args", "resolution", "sdpa", "network_module", "wandb_run_name",
                     "loss_type", "huber_c", "clip_skip", "max_token_length", "dataset_config"):
        assert honoured not in unused
    # 2 pairs x 2 repeats + 2 pairs, read from both subsets (.txt and .caption captions)
    assert "6 pairs from" in out
    lora = tmp_path / "model" / "my_style_v1.safetensors"
    with safe_open(str(lora), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_te_") for k in keys)  # the text encoder trains (text_encoder_lr)
    assert any("proj_in" in k for k in keys) and any("ff_net_2" in k for k in keys)
    assert metadata["ss_network_dim"] == "32" and metadata["ss_network_alpha"] == "16.0"
    assert metadata["ss_optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit"
    fresh = tiny_sd15_pipeline(0)
    fresh.load_lora_weights(str(lora))  # loads where sd-scripts LoRAs load
