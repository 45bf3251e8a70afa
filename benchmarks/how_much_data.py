"""How much data: the toy world's reward gain against the number of prompts and of candidates.

    nice -n 10 python benchmarks/how_much_data.py [--quick] [--prompts 32 64 128 256]
        [--candidates 2 4 8] [--seeds 0 1 2] [--out outputs/how_much_data]

The demo preset (SIPO, colour reward) with its [pairs] path: the candidates of the largest grid
point are sampled and scored once (a candidate's seed depends only on its prompt slot and index,
so the first N slots x first K candidates of that folder are exactly what a run with N prompts and
K candidates samples); every (N, K) makes its best-vs-worst pairs from that subset
(`sipo-pairs make`), trains 200 steps and is evaluated on the demo's evaluation set. Prints one
row per (N, K, seed) and the mean gain per (N, K); writes <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def subset_folder(source: Path, target: Path, prompts: int, candidates: int) -> Path:
    """A candidates folder holding the first ``prompts`` slots x ``candidates`` of ``source``
    (records and scores filtered; images and latents linked, not copied)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("images", "latents"):
        if not (target / name).exists():
            os.symlink((source / name).resolve(), target / name)
    for name in ("candidates.jsonl", "scores.jsonl"):
        rows = [json.loads(line) for line in (source / name).read_text().splitlines() if line]
        keep = [r for r in rows if in_subset(r["id"], prompts, candidates)]
        (target / name).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
    return target


def in_subset(cid: str, prompts: int, candidates: int) -> bool:
    """'p00003-c01' is prompt slot 3, candidate 1."""
    p, c = cid[1:].split("-c")
    return int(p) < prompts and int(c) < candidates


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--candidates", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval_samples", type=int, default=256)
    parser.add_argument("--quick", action="store_true",
                        help="32 / 64 prompts x 2 / 4 candidates, one seed, 100 steps, 64 eval samples")
    parser.add_argument("--out", default="outputs/how_much_data")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.candidates, args.seeds = [32, 64], [2, 4], [0]
        args.steps, args.eval_samples = 100, 64
    import torch
    torch.set_num_threads(1)
    from sipo_plugin.pairs.make import make_manifest
    from sipo_plugin.pairs.onpolicy import make_training_pairs
    from sipo_plugin.training.config import load_config
    from sipo_plugin.training.run import run

    out = Path(args.out)
    demo = ROOT / "presets" / "demo.toml"
    full = out / "candidates"
    start = time.time()
    make_training_pairs(load_config(demo, [
        "--train_data", str(out / "all_pairs.jsonl"), "--candidates_dir", str(full),
        "--num_prompts", str(max(args.prompts)), "--candidates", str(max(args.candidates)),
        "--output_dir", str(out)]))
    sampled_s = time.time() - start
    rows = []
    for n in args.prompts:
        for k in args.candidates:
            folder = subset_folder(full, out / f"n{n}_k{k}", n, k)
            counts = make_manifest(folder, folder / "pairs.jsonl")
            for seed in args.seeds:
                config = load_config(demo, [
                    "--train_data", str(folder / "pairs.jsonl"), "--pairs_prompts", '""',
                    "--output_dir", str(folder / f"seed{seed}"), "--seed", str(seed),
                    "--max_train_steps", str(args.steps), "--eval_samples", str(args.eval_samples),
                    "--train_batch_size", str(min(8, counts.pairs))])
                stats = run(config)["eval"]
                rows.append({"prompts": n, "candidates": k, "pairs": counts.pairs, "seed": seed,
                             "gain": stats["reward_gain"], "se": stats["reward_se"],
                             "win_rate": stats["win_rate"],
                             "tuned_fidelity": stats["tuned_fidelity"]})
                print(json.dumps(rows[-1]), flush=True)
    summary = {"settings": vars(args), "sample_and_score_s": round(sampled_s, 1), "rows": rows,
               "mean_gain": {f"{n}x{k}": statistics.mean(r["gain"] for r in rows
                                                          if (r["prompts"], r["candidates"]) == (n, k))
                             for n in args.prompts for k in args.candidates}}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    for key, gain in summary["mean_gain"].items():
        print(f"{key:>8s} prompts x candidates: mean gain {gain:+.4f}")
    return summary


if __name__ == "__main__":
    main()
