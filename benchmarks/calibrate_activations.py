"""Fit --estimate's activation formula: measured peak step memory against the saved-tensor count.

    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/calibrate_activations.py

For the tiny SD1.5-layout model (tests/tiny_models.py) and the mid-size one (benchmarks/low_vram.py:
U-Net 139.7M parameters, SD1.5's block layout at channels 128/256/512/512), at a few resolutions,
pairs per micro-batch and with / without gradient checkpointing, one LoRA step as the trainer runs
it (policy forward with grad, reference forward with the adapter off and no grad, loss, backward,
optimizer step), fp32 on the CPU.

Measured: the step's peak resident memory over the resident memory before it, read from Linux's
VmHWM after resetting it (``echo 5 > /proc/self/clear_refs``), minus the gradients the step
allocates (known exactly); glibc's mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_) so freed
tensors leave the resident set at once. Predicted: ``saved_activation_bytes`` on the meta device.
The least-squares fit measured = slope * saved + intercept and every point's relative error are
printed (and written as JSON with --out); the constants go into
sipo_plugin/estimate/activations.py CALIBRATION.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks"), str(ROOT)]
CACHE = ROOT / "benchmarks" / ".cache"

# model -> [(pairs, resolution)], each with and without gradient checkpointing
POINTS = {"tiny": [(1, 64), (2, 128), (1, 256)], "mid": [(1, 128), (2, 128), (1, 256)]}


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def model_folder(name: str) -> Path:
    if name == "mid":
        from low_vram import build_midsize_sd15
        return build_midsize_sd15(CACHE / "midsize_sd15")
    folder = CACHE / "tiny_sd15"
    if not (folder / "model_index.json").is_file():
        from tiny_models import tiny_sd15_pipeline
        tiny_sd15_pipeline(0).save_pretrained(folder)
    return folder


def measured_step_bytes(config) -> int:
    """Peak resident bytes of one LoRA step over the bytes before it, gradients left out."""
    import torch
    from sipo_plugin.estimate.estimate import latent_factor
    from sipo_plugin.models import get_model_adapter
    from sipo_plugin.training.memory import build_optimizer, enable_gradient_checkpointing
    adapter = get_model_adapter("sd15").load(config.model, device=torch.device("cpu"))
    params = adapter.add_trainable(config.network)
    if config.training.gradient_checkpointing:
        enable_gradient_checkpointing(adapter.trainable_modules())
    optimizer = build_optimizer(params, config.training, print)
    unet, pairs = adapter.unet, config.training.train_batch_size
    side = config.data.resolution // latent_factor(adapter)
    noisy = torch.randn(2 * pairs, 4, side, side)
    timesteps = torch.randint(0, 1000, (2 * pairs,))
    cond = {"encoder_hidden_states": torch.randn(2 * pairs, 77, unet.config.cross_attention_dim)}

    def step():
        pred = adapter.predict(noisy, timesteps, cond)
        with torch.no_grad(), adapter.reference():
            ref = adapter.predict(noisy, timesteps, cond)
        (pred - ref).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on
    reset_peak()
    before = rss_bytes("VmRSS")
    step()
    grads = sum(p.numel() * p.element_size() for p in params)
    return rss_bytes("VmHWM") - before - grads


def predicted_saved_bytes(config) -> int:
    from sipo_plugin.estimate.estimate import estimate
    table = estimate(config, calibration={"slope": 1.0, "intercept_bytes": 0}).activations
    t = config.training
    return table[(t.train_batch_size, config.data.resolution, t.gradient_checkpointing)]


def fit(rows: list[dict]) -> dict:
    """Least squares measured = slope * saved + intercept; the relative error of each point."""
    n = len(rows)
    xs, ys = [r["saved"] for r in rows], [r["measured"] for r in rows]
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    for r in rows:
        r["fitted"] = slope * r["saved"] + intercept
        r["error"] = r["fitted"] / r["measured"] - 1
    return {"slope": slope, "intercept_bytes": int(intercept)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--out", type=Path, help="also write the rows and the fit as JSON here")
    args = parser.parse_args(argv)
    from sipo_plugin.training.config import load_config
    from test_training import make_rendered_pairs
    manifest = make_rendered_pairs(CACHE / "pairs", n_pairs=8)
    rows = []
    for model in args.models:
        folder = model_folder(model)
        for pairs, resolution in POINTS[model]:
            for checkpointing in (False, True):
                config = load_config(None, [
                    "--pretrained_model_name_or_path", str(folder), "--train_data", str(manifest),
                    "--resolution", str(resolution), "--train_batch_size", str(pairs),
                    "--gradient_checkpointing", str(checkpointing).lower(),
                    "--output_dir", str(CACHE / "calibration_run")])
                row = {"model": model, "pairs": pairs, "resolution": resolution,
                       "checkpointing": checkpointing, "saved": predicted_saved_bytes(config),
                       "measured": measured_step_bytes(config)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    calibration = fit(rows)
    print("\n| model | pairs | resolution | checkpointing | saved (MiB) | measured (MiB) | "
          "fitted (MiB) | error |\n|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['pairs']} | {r['resolution']} | {r['checkpointing']} | "
              f"{r['saved'] / 2**20:.1f} | {r['measured'] / 2**20:.1f} | "
              f"{r['fitted'] / 2**20:.1f} | {r['error']:+.1%} |")
    print(f"\nCALIBRATION = {json.dumps(calibration)}; largest |error| "
          f"{max(abs(r['error']) for r in rows):.1%}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "calibration.json").write_text(json.dumps({"rows": rows, "fit": calibration},
                                                              indent=2))
    return calibration


if __name__ == "__main__":
    main()
