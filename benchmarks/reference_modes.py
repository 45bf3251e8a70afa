"""Step time and peak memory of the reference modes (LoRA and full fine-tuning) on the toy model.

    python benchmarks/reference_modes.py [--steps 40] [--batch 8] [--threads 1]

Each setting trains in its own subprocess (so peak RSS is its own) with sipo, kappa = 'auto', on
64 rendered toy pairs at 32 px; the step time is the median over the steps after a warm-up of 5;
"step CPU" is the process CPU time of a step (less sensitive to other load on the machine than
wall time); "setup" is the time before the first step (loading, caches, the cached reference's
pre-pass).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "lora / auto (adapter off)": ["--finetune", "lora", "--reference", "auto"],
    "lora / frozen_copy": ["--finetune", "lora", "--reference", "frozen_copy"],
    "lora / cached": ["--finetune", "lora", "--reference", "cached", "--cache_latents", "true"],
    "lora / auto + cache_latents": ["--finetune", "lora", "--reference", "auto",
                                    "--cache_latents", "true"],
    "full / auto (frozen copy)": ["--finetune", "full", "--reference", "auto"],
    "full / cached": ["--finetune", "full", "--reference", "cached", "--cache_latents", "true"],
}


def one(name: str, steps: int, batch: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_training import make_rendered_pairs

    from sipo_plugin.training import loop
    from sipo_plugin.training.config import load_config

    times: list[float] = []
    cpu_times: list[float] = []
    stamps: list[float] = []
    original = loop.train_step

    def timed_step(*args, **kwargs):
        start, cpu_start = time.perf_counter(), time.process_time()
        stamps.append(start)
        out = original(*args, **kwargs)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        return out

    loop.train_step = timed_step
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_rendered_pairs(Path(tmp) / "pairs", n_pairs=64)
        config = load_config(None, [
            "--train_data", str(manifest), "--output_dir", str(Path(tmp) / "out"),
            "--resolution", "32", "--learning_rate", "1e-4", "--objective", "sipo",
            "--max_train_steps", str(steps), "--train_batch_size", str(batch),
            "--logging_steps", str(steps), *SETTINGS[name]])
        started = time.perf_counter()
        loop.train(config)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"setting": name, "step_s": statistics.median(times[5:]),
            "step_cpu_s": statistics.median(cpu_times[5:]), "setup_s": stamps[0] - started,
            "peak_rss_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.batch, args.threads)))
        return
    print(f"toy model, sipo, {args.batch} pairs/step, {args.steps} steps, {args.threads} threads")
    print("| finetune / reference | step wall (ms) | step CPU (ms) | setup wall (s) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name in SETTINGS:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {1000 * r['step_s']:.1f} | {1000 * r['step_cpu_s']:.1f} "
              f"| {r['setup_s']:.1f} | {r['peak_rss_mb']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
