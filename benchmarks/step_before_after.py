"""The trainer's step at an earlier commit against this tree's, interleaved, in one run.

    OMP_NUM_THREADS=1 python benchmarks/step_before_after.py --base ebf661f \\
        --configs "toy live sft" "mid cached sft" [--rounds 3]

Issue 15 asked for "SFT without a reference at least 1.3x faster than today's SFT": "today's" is
the code before objectives declared ``needs_reference`` (commit ebf661f, the parent of 7804f76),
which ran the reference forward for SFT and paid the per-step host overhead that 7804f76 removed.
``step_floor.py``'s "sft + reference" row forces the reference back on in today's code, so it
measures one of the two savings only; this script measures both, by running the old commit itself.

The base commit is checked out into a temporary git worktree. Each configuration ("SIZE CACHE
OBJECTIVE": toy or mid, live or cached, any registered objective) runs once per round in each tree,
alternately, each run in its own process (one thread) on the same pairs and model; a step's time is
the process's CPU time from one ``train_step`` call to the next (the whole loop iteration); each
number is the median over rounds x timed steps, and the per-round ratios show the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from step_floor import trainer_overrides  # noqa: E402  (the same sizes and settings)

# Runs inside the tree under test (argv: tree, config JSON): the list of per-step CPU
# times on stdout. Only load_config, loop.train and loop.train_step are used: both trees have them.
CHILD = r"""
import json, sys, time
tree, spec = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, tree)
import torch
torch.set_num_threads(1)
from sipo_plugin.training import loop
from sipo_plugin.training.config import load_config
marks, original = [], loop.train_step
def timed(*args, **kwargs):
    marks.append(time.process_time())
    return original(*args, **kwargs)
loop.train_step = timed
loop.train(load_config(None, spec["overrides"]))
marks.append(time.process_time())
steps = [b - a for a, b in zip(marks, marks[1:])][spec["warmup"]:-1]
assert sys.modules["sipo_plugin"].__file__.startswith(tree), "imported the wrong tree"
print(json.dumps(steps))
"""


def run_in(tree: Path, spec: dict) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tree), json.dumps(spec)], cwd=tree,
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the run in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the earlier commit")
    p.add_argument("--configs", nargs="+", default=["toy live sft", "mid cached sft"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--toy-steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--mid-steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=2, help="pairs per step")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    from low_vram import CACHE, build_midsize_sd15
    from test_training import make_rendered_pairs

    models = {"toy": "toy", "mid": str(build_midsize_sd15(CACHE / "midsize_sd15"))}
    results: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old),
                        args.base], check=True, capture_output=True)
        try:
            manifest = make_rendered_pairs(Path(tmp) / "pairs", n_pairs=8)
            for r in range(args.rounds):
                for i, config in enumerate(args.configs):
                    size = config.split()[0]
                    steps = {"toy": args.toy_steps, "mid": args.mid_steps}[size]
                    cell = results.setdefault(config, {"before": [], "after": [], "rounds": []})
                    medians = []
                    for name, tree in (("before", old), ("after", ROOT)):
                        spec = {"warmup": args.warmup, "overrides": trainer_overrides(
                            *config.split(), models[size], manifest,
                            Path(tmp) / f"out_{name}_{r}_{i}", args.warmup + steps + 1,
                            args.batch)}
                        times = run_in(tree, spec)
                        cell[name] += times
                        medians.append(statistics.median(times))
                    cell["rounds"].append(medians[0] / medians[1])
                    print(f"round {r + 1}: {config:22s} before {1000 * medians[0]:8.1f} ms, "
                          f"after {1000 * medians[1]:8.1f} ms CPU", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                           check=False)
    print(f"base {args.base}; {args.batch} pairs/step, one thread; median of {args.rounds} rounds "
          f"x timed steps; load average at the end {os.getloadavg()[0]:.1f}\n")
    print(f"| configuration | {args.base}, CPU ms | this tree, CPU ms | speed-up | per round |")
    print("|---|---:|---:|---:|---|")
    for config, cell in results.items():
        before, after = (1000 * statistics.median(cell[k]) for k in ("before", "after"))
        print(f"| {config} | {before:.1f} | {after:.1f} | {before / after:.2f}x | "
              f"{', '.join(f'{x:.2f}' for x in cell['rounds'])} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
