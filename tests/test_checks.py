"""Start-up checks (issue 10, points 6 and 8): ranges, every problem reported, --check without
torch, family mismatch, and the pair data (bad UTF-8, same-file pairs, 16-bit PNGs, decompression
bombs, corrupt images found before step 1, errors from DataLoader workers)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train_sipo
from sipo_plugin.data import PairDataError, make_pair_loader, read_pairs
from sipo_plugin.data.images import open_rgb
from sipo_plugin.training.config import ConfigError, load_config
from sipo_plugin.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    manifest = folder / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def image(path: Path, color=(200, 30, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path.name


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["--sample_steps", "0", "--adam_beta1", "1.0", "--seed", "-1",
                           "--max_grad_norm", "-1", "--lr_warmup_steps", "-2",
                           "--adam_epsilon", "0", "--dataloader_num_workers", "-1",
                           "--train_data", "/nonexistent/pairs.jsonl"])
    text = "\n".join(info.value.problems)
    for key in ("sample_steps", "adam_beta1", "'seed' must be in [0, 4294967295]", "max_grad_norm",
                "lr_warmup_steps", "adam_epsilon", "dataloader_num_workers",
                "train_data not found"):
        assert key in text, key
    assert len(info.value.problems) == 8


def test_unknown_keys_in_several_sections_are_all_reported(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text("[data]\nresolutoin = 32\n[training]\nlearnig_rate = 1e-4\nseed = 'x'\n")
    with pytest.raises(ConfigError) as info:
        load_config(preset)
    assert len(info.value.problems) == 3
    assert "did you mean 'resolution'" in info.value.problems[0]


def test_calibration_batches_gets_a_migration_line():
    with pytest.raises(ConfigError, match="replaced by 'calibration_pairs'"):
        load_config(None, ["--calibration_batches", "8"])


def test_check_imports_no_torch_and_lists_each_problem(tmp_path):
    """--check parses and validates without torch or diffusers (that is what keeps it under 3 s)."""
    code = ("import sys, train_sipo; rc = train_sipo.main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "print('HEAVY', heavy, 'RC', rc)")
    out = subprocess.run([sys.executable, "-c", code, "--preset", str(ROOT / "presets/demo.toml"),
                          "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "HEAVY [] RC 0" in out.stdout, out.stderr
    bad = subprocess.run([sys.executable, "-c", code, "--preset", str(ROOT / "presets/demo.toml"),
                          "--check", "--sample_steps", "0", "--family", "sdxl"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "HEAVY [] RC 2" in bad.stdout
    assert "'sample_steps' must be >= 1" in bad.stderr
    assert "family mismatch" in bad.stderr  # the toy model is an SD1.5 pipeline


def test_family_mismatch_reads_model_index(tmp_path, capsys):
    folder = tmp_path / "sd15_model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    manifest = write_manifest(tmp_path, [{"prompt": "p", "chosen": image(tmp_path / "a.png"),
                                          "rejected": image(tmp_path / "b.png", (0, 0, 0))}])
    args = ["--preset", str(ROOT / "presets/sdxl_lora_sipo.toml"), "--check",
            "--pretrained_model_name_or_path", str(folder), "--train_data", str(manifest),
            "--train_batch_size", "1"]
    assert train_sipo.main(args) == 2
    err = capsys.readouterr().err
    assert "family mismatch" in err and 'set family = "sd15"' in err
    assert train_sipo.main([*args, "--family", "sd15", "--lora_format", "kohya"]) == 0


def test_manifest_in_bad_utf8_names_file_and_line(tmp_path):
    a, b = image(tmp_path / "a.png"), image(tmp_path / "b.png", (0, 0, 0))
    manifest = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "p", "chosen": a, "rejected": b}).encode()
    bad = json.dumps({"prompt": "caf\u00e9", "chosen": a, "rejected": b}, ensure_ascii=False).encode()
    manifest.write_bytes(good + b"\n" + good + b"\n" + bad.replace("é".encode(), b"\xe9") + b"\n")
    with pytest.raises(PairDataError, match=r"pairs.jsonl line 3: not UTF-8") as info:
        read_pairs(manifest)
    assert "\n" not in str(info.value)
    csv = tmp_path / "pairs.csv"
    csv.write_bytes(b"prompt,chosen,rejected\nok," + a.encode() + b"," + b.encode() + b"\n\xff,a,b\n")
    with pytest.raises(PairDataError, match=r"pairs.csv line 3: not UTF-8"):
        read_pairs(csv)


def test_pairs_with_one_file_as_chosen_and_rejected_are_refused_and_counted(tmp_path):
    a, b = image(tmp_path / "a.png"), image(tmp_path / "b.png", (0, 0, 0))
    (tmp_path / "a_link.png").symlink_to(tmp_path / "a.png")
    rows = [{"prompt": "p", "chosen": a, "rejected": b},
            {"prompt": "p", "chosen": a, "rejected": a},
            {"prompt": "p", "chosen": b, "rejected": b},
            {"prompt": "p", "chosen": a, "rejected": "a_link.png"}]
    with pytest.raises(PairDataError, match=r"3 of 4 pairs use the same file .*first: pair 2"):
        read_pairs(write_manifest(tmp_path, rows))


def test_16_bit_grayscale_png_keeps_its_values(tmp_path):
    """Pillow's own convert("RGB") turns 16-bit grayscale into pure white; v8 = v16 >> 8."""
    v16 = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)  # 0 .. 65535
    Image.fromarray(v16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(open_rgb(tmp_path / "g16.png"))
    assert rgb.shape == (16, 16, 3)
    expected = (v16.astype(np.int64) >> 8).astype(np.uint8)  # 0, 1, ..., 255 row-major
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert rgb[0, 0, 0] == 0 and rgb[15, 15, 0] == 255 and rgb[8, 0, 0] == 128


def test_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: a bomb
    with pytest.raises(PairDataError, match=r"big.png: image too large to decode safely") as info:
        open_rgb(path)
    assert "\n" not in str(info.value)


def corrupt_last_pair(tmp_path: Path, n_pairs: int = 4) -> Path:
    """Pairs whose LAST image in the data order is corrupt (a truncated PNG)."""
    rows = []
    for i in range(n_pairs):
        rows.append({"prompt": "a red square", "chosen": image(tmp_path / f"{i}w.png"),
                     "rejected": image(tmp_path / f"{i}l.png", (0, 0, 200))})
    (tmp_path / f"{n_pairs - 1}l.png").write_bytes((tmp_path / "0w.png").read_bytes()[:40])
    return write_manifest(tmp_path, rows)


def test_corrupt_image_at_the_end_stops_before_step_1(tmp_path):
    manifest = corrupt_last_pair(tmp_path)
    out = tmp_path / "run"
    config = load_config(None, ["--train_data", str(manifest), "--resolution", "32",
                                "--output_dir", str(out), "--max_train_steps", "2",
                                "--train_batch_size", "2", "--calibration_pairs", "4"])
    with pytest.raises(PairDataError, match=r"3l.png: cannot decode image"):
        train(config)
    log = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""
    assert '"step"' not in log and not list(out.glob("*.safetensors"))


def test_check_deep_lists_every_corrupt_image(tmp_path, capsys):
    manifest = corrupt_last_pair(tmp_path)
    (tmp_path / "0w.png").write_bytes(b"not a png")
    args = ["--check", "--train_data", str(manifest), "--train_batch_size", "2"]
    assert train_sipo.main(args) == 0  # paths and captions are fine: no decode without --deep
    capsys.readouterr()
    assert train_sipo.main([*args, "--deep"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "0w.png" in errors[0] and "3l.png" in errors[1]


def test_data_error_in_a_dataloader_worker_is_the_same_one_line(tmp_path):
    records = read_pairs(corrupt_last_pair(tmp_path, n_pairs=1))
    with pytest.raises(PairDataError) as direct:
        open_rgb(records[0].rejected)
    loader = make_pair_loader(records, resolution=16, batch_size=1, seed=0, total=1, num_workers=1)
    with pytest.raises(PairDataError) as info:
        next(iter(loader))
    assert str(info.value) == str(direct.value)
    assert "\n" not in str(info.value)
