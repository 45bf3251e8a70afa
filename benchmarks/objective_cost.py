"""Cost of each objective and each reference mode at two toy model sizes, as ratios to
Diffusion-DPO with a LoRA (reference = adapter off), measured in one run.

    python benchmarks/objective_cost.py [--steps 25] [--batch 4] [--threads 1]

Sizes: the bundled toy U-Net (block_out_channels 64, 64) and a wider one built from the same
architecture config with 4x the channels (256, 256), random weights (timing only), saved beside the
bundled VAE and text encoder in the diffusers layout. Every configuration trains in its own
subprocess (so peak RSS is its own) on 32 rendered toy pairs at 32 px; the step time is the median
over the steps after a warm-up of 5, as wall time and as the process's CPU time (the CPU time is
what to compare on a shared machine: it does not grow when other processes compete for the cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import peak_rss_mb, timed_train_steps, trained_parameters

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "diffusion-dpo / lora / auto"
# label -> command-line overrides
CONFIGS = {
    BASELINE: ["--objective", "diffusion-dpo"],
    "sft / lora / auto": ["--objective", "sft"],
    "dpo-cm / lora / auto": ["--objective", "dpo-cm"],
    "sipo / lora / auto": ["--objective", "sipo"],
    "sipo (shared_max) / lora / auto": ["--objective", "sipo", "--pair_weight", '"shared_max"'],
    "diffusion-dpo / lora / frozen_copy": ["--objective", "diffusion-dpo",
                                           "--reference", "frozen_copy"],
    "diffusion-dpo / lora / cached": ["--objective", "diffusion-dpo", "--reference", "cached",
                                      "--cache_latents", "true"],
    "diffusion-dpo / full / auto (frozen copy)": ["--objective", "diffusion-dpo",
                                                  "--finetune", "full"],
    "diffusion-dpo / full / cached": ["--objective", "diffusion-dpo", "--finetune", "full",
                                      "--reference", "cached", "--cache_latents", "true"],
}
WIDE_CHANNELS = (256, 256)


def build_wide_model(folder: Path) -> Path:
    """The bundled toy pipeline with its U-Net replaced by a 4x wider one (random weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    from sipo_plugin.toy.architecture import unet_config
    from sipo_plugin.toy.pipeline import TOY_MODEL_DIR

    shutil.copytree(TOY_MODEL_DIR, folder)
    shutil.rmtree(folder / "unet")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**unet_config(), "block_out_channels": WIDE_CHANNELS})
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    return folder


def one(label: str, model: str, steps: int, batch: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_training import make_rendered_pairs

    from sipo_plugin.training import loop
    from sipo_plugin.training.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_rendered_pairs(Path(tmp) / "pairs", n_pairs=32)
        config = load_config(None, [
            "--pretrained_model_name_or_path", model, "--train_data", str(manifest),
            "--output_dir", str(Path(tmp) / "out"), "--resolution", "32",
            "--learning_rate", "1e-4", "--max_train_steps", str(steps),
            "--train_batch_size", str(batch), "--logging_steps", str(steps), *CONFIGS[label]])
        with timed_train_steps() as times:
            result = loop.train(config)
    return {"config": label, "step_s": statistics.median(times.wall[5:]),
            "step_cpu_s": statistics.median(times.cpu[5:]),
            "trainable_params": trained_parameters(result.adapter),
            "peak_rss_mb": peak_rss_mb()}


def measure(models: dict[str, str], args) -> list[dict]:
    rows = []
    for size, model in models.items():
        for label in CONFIGS:
            out = subprocess.run(
                [sys.executable, __file__, "--one", label, "--model", model, "--steps",
                 str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads)],
                check=True, capture_output=True, text=True)
            rows.append({"size": size, **json.loads(out.stdout.strip().splitlines()[-1])})
            print(f"  {size:6s} {label:42s} {1000 * rows[-1]['step_cpu_s']:8.1f} ms CPU",
                  file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| size | objective / finetune / reference | trainable params | step CPU (ms) | "
             "step wall (ms) | CPU vs DPO-LoRA | peak RSS (MB) | RSS vs DPO-LoRA |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = next(b for b in rows if b["size"] == r["size"] and b["config"] == BASELINE)
        lines.append(
            f"| {r['size']} | {r['config']} | {r['trainable_params']:,} | "
            f"{1000 * r['step_cpu_s']:.1f} | {1000 * r['step_s']:.1f} | "
            f"{r['step_cpu_s'] / base['step_cpu_s']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="toy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.model, args.steps, args.batch, args.threads)))
        return
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        wide = build_wide_model(Path(tmp) / "toy_wide")
        rows = measure({"toy": "toy", "toy-4x": str(wide)}, args)
    header = (f"toy model at 32 px, {args.batch} pairs/step, median of {args.steps - 5} steps, "
              f"{args.threads} thread(s); measured in {time.time() - started:.0f} s")
    print(table(rows, header))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
