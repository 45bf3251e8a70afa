"""Step time and peak RSS of a Wan LoRA sipo step on the CPU (tiny and mid-size Wan configs).

    python benchmarks/wan_step_time.py [--size tiny|mid|both] [--steps N] [--threads 1]

Each size trains in its own subprocess (so peak RSS is its own) through the real trainer
(``sipo_plugin.training.run``) on tiny video pairs (mp4 + frame folder), one pair per step, LoRA
rank 16 on the attention, ``mixed_precision = "no"``; the step time is the median of
``loop.train_step`` after the first step (it includes the VAE and UMT5 encodes, which are tiny here).

- tiny: the test model (tests/tiny_wan.py): 2 blocks of 2 heads x 12, clips 5 x 32 x 32
  (latents 2 x 4 x 4);
- mid: 2 blocks of Wan2.1-1.3B's width (12 heads x 128 = 1536, ffn 8960), clips 17 x 240 x 416
  (latents 5 x 30 x 52: 1950 tokens per clip); the text encoder and VAE stay tiny.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import peak_rss_mb, timed_train_steps

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "tiny": {"transformer": {}, "clip": (5, 32, 32), "steps": 20},
    "mid": {"transformer": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                freq_dim=256, rope_max_seq_len=1024),
            "clip": (17, 240, 416), "steps": 4},
}


def one(size: str, steps: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_video import write_video_pairs
    from tiny_wan import save_tiny_wan

    from sipo_plugin.training.config import load_config
    from sipo_plugin.training.run import run

    spec = SIZES[size]
    frames, height, width = spec["clip"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = save_tiny_wan(tmp / "wan", **spec["transformer"])
        manifest = write_video_pairs(tmp / "clips", num_pairs=1, num_frames=frames, height=height,
                                     width=width)
        config = load_config(None, [
            "--family", "wan", "--pretrained_model_name_or_path", str(folder),
            "--train_data", str(manifest), "--num_frames", str(frames),
            "--video_height", str(height), "--video_width", str(width), "--lora_format", "wan",
            "--output_dir", str(tmp / "out"), "--max_train_steps", str(steps),
            "--train_batch_size", "1", "--network_dim", "16", "--network_alpha", "16",
            "--objective", "sipo", "--calibration_pairs", "1", "--logging_steps", "1000"])
        transformer_params = None
        with timed_train_steps() as steps_timed:
            run(config)
        times = steps_timed.wall
        from diffusers import WanTransformer3DModel
        transformer_params = sum(p.numel() for p in
                                 WanTransformer3DModel.from_pretrained(folder / "transformer").parameters())
    peak_mb = peak_rss_mb()
    return {"size": size, "transformer_params": transformer_params, "clip": spec["clip"],
            "steps": len(times), "median_step_s": round(statistics.median(times[1:]), 3),
            "first_step_s": round(times[0], 3), "peak_rss_mb": round(peak_mb)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "mid", "both"], default="both")
    parser.add_argument("--steps", type=int, default=0, help="steps per size (0: 20 tiny, 4 mid)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.steps or SIZES[args.child]["steps"], args.threads)))
        return
    for size in (["tiny", "mid"] if args.size == "both" else [args.size]):
        out = subprocess.run([sys.executable, __file__, "--child", size, "--steps", str(args.steps),
                              "--threads", str(args.threads)], capture_output=True, text=True,
                             check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
