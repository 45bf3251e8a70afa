"""benchmarks/gpu_check.py on the CPU: tiny models at 64 px through the real trainer, for the
presets that cover full fine-tuning (8-bit AdamW, cached reference and encoders) and SDXL."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_image_preset_has_a_run_and_sdxl_a_full_variant():
    gpu_check = load_gpu_check()
    names = [name for name, _, _ in gpu_check.runs(sorted((ROOT / "presets").glob("*.toml")))]
    assert "sd15_full_sipo" in names and "sdxl_lora_sipo_8gb + finetune=full" in names
    assert not any(n.startswith(("wan", "cogvideox", "demo")) for n in names)


def test_smoke_on_cpu(tmp_path):
    gpu_check = load_gpu_check()
    rows = gpu_check.main(["--out", str(tmp_path), "--tiny", "--steps", "2",
                           "--presets", "sd15_full_sipo", "sdxl_lora_sipo_8gb"])
    assert [r["run"] for r in rows] == ["sd15_full_sipo", "sdxl_lora_sipo_8gb",
                                        "sdxl_lora_sipo_8gb + finetune=full"]
    for row in rows:
        assert "skipped" not in row, row
        assert row["resolution"] == 64 and row["s_per_step"] > 0 and row["estimate_mib"] > 0
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["rows"] == rows and saved["device"].startswith("cpu")
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| sd") == 3 and "n/a (CPU)" in table
