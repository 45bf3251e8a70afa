"""Cost of the pairs path on the toy model: candidate sampling and scoring throughput against batch
size, and the cost of `make`.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/pairs_throughput.py [--candidates 64]
        [--batch_sizes 1 4 16 64] [--steps 20]

Each batch size samples the same candidates (the toy prompts, 2 per prompt slot, [sampling] of the
demo) into its own folder with `sample_candidates`; the largest folder is then scored with the
colour reward at each batch size (`score_candidates`) and paired (`make_manifest`). Prints
candidates/s per batch size and the ratio to batch size 1, measured in one process.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=64, help="candidates per measurement")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from sipo_plugin.pairs.make import make_manifest
    from sipo_plugin.pairs.prompts import cycle_prompts, read_prompts
    from sipo_plugin.pairs.sample import load_sampling_adapter, sample_candidates, settings_from
    from sipo_plugin.pairs.score import SCORES_FILE, score_candidates
    from sipo_plugin.rewards import build_reward
    from sipo_plugin.training.config import load_config

    config = load_config(ROOT / "presets" / "demo.toml", ["--sampler_steps", str(args.steps)])
    adapter = load_sampling_adapter(config.model, cpu=True)
    settings = settings_from("sd15", config.sampling)
    entries = cycle_prompts(read_prompts("toy"), args.candidates // 2)
    reward = build_reward("colour", device="cpu")
    out = {"sample": {}, "score": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.batch_sizes:
            start = time.perf_counter()
            sample_candidates(adapter, entries, Path(tmp) / f"b{b}", settings=settings,
                              candidates=2, batch_size=b, progress=False)
            out["sample"][b] = args.candidates / (time.perf_counter() - start)
        folder = Path(tmp) / f"b{max(args.batch_sizes)}"
        for b in args.batch_sizes:
            (folder / SCORES_FILE).unlink(missing_ok=True)
            start = time.perf_counter()
            score_candidates(folder, [reward], batch_size=b, progress=False)
            out["score"][b] = args.candidates / (time.perf_counter() - start)
        start = time.perf_counter()
        make_manifest(folder, Path(tmp) / "pairs.jsonl")
        out["make_s"] = time.perf_counter() - start
        shutil.rmtree(tmp, ignore_errors=True)
    first = args.batch_sizes[0]
    print(f"toy model, {args.steps} DDIM steps, {args.candidates} candidates, one thread")
    for kind in ("sample", "score"):
        for b, rate in out[kind].items():
            print(f"{kind:6s} batch {b:3d}: {rate:8.1f} candidates/s  "
                  f"({rate / out[kind][first]:.2f}x batch {first})")
    print(f"make (best_worst, {args.candidates // 2} prompts): {out['make_s'] * 1000:.0f} ms")
    return out


if __name__ == "__main__":
    main()
