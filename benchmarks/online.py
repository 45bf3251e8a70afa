"""Online against offline preference training on the toy world, at equal optimizer steps.

    nice -n 10 python benchmarks/online.py            # 4 data kinds x 3 objectives x 3 seeds
    nice -n 10 python benchmarks/online.py --quick    # 1 seed, 30 steps, 32 evaluation samples
    nice -n 10 python benchmarks/online.py --report-only   # aggregate the runs written so far

Four kinds of pair data, each trained with the same objectives, steps, batch, learning rate and
seeds (the runs, evaluation and statistics of `benchmarks/objectives_benchmark.py`):

- ``offline_on_policy``: ``--num-pairs`` prompt slots, two candidates each, sampled once from the
  bundled toy model (the base) before training, best against worst by the colour reward;
- ``offline_off_policy``: the same from the early pretraining checkpoint (the off-policy pairs of
  objectives_benchmark.py);
- ``online_every_N`` (one per ``--refresh`` N): [online] training, the pairs refreshed from the
  policy before every N-th step; each run samples as many prompt slots in all as the offline
  pairs hold (prompts_per_refresh = ceil(num_pairs / refreshes)) and its pool keeps them all.

Per (data, objective): reward gain, win rate and prompt fidelity of the final LoRA against the
base model (the toy evaluation), the run's wall time (training, with an online run's sampling and
scoring; an offline run adds the one-time cost of sampling its pairs, measured when they were
made) and the reward gain per wall-second; each online and off-policy cell against the offline
on-policy cell of its objective, paired by seed, with a t-test verdict at 95%. Writes
``<out>/{full,quick}/results.json``, ``summary.md`` and ``reward_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import objectives_benchmark as ob  # noqa: E402  (the toy benchmark's runs, inputs and statistics)

OBJECTIVES = ("diffusion-dpo", "dpo-cm", "sipo")
OFFLINE = ("offline_on_policy", "offline_off_policy")
REFERENCE = "offline_on_policy"
QUICK_EARLY_MODEL = {"early_vae_steps": 100, "early_unet_steps": 150, "early_images": 1000}


def online_overrides(refresh: int, s: ob.Settings) -> tuple[str, ...]:
    """[online] settings of a run refreshed every ``refresh`` steps: the offline runs' sampler,
    reward and pair rule, and as many prompt slots in all as they have pairs."""
    refreshes = math.ceil(s.steps / refresh)
    return ("--online_prompts", "toy", "--online_rewards", '["colour"]',
            "--refresh_every_n_steps", str(refresh),
            "--prompts_per_refresh", str(math.ceil(s.num_pairs / refreshes)),
            "--candidates_per_prompt", "2", "--pool_size", str(s.num_pairs),
            "--sampler", "ddim", "--sampler_steps", "20", "--guidance_scale", str(ob.TOY_GUIDANCE),
            "--sample_batch_size", "64")


def offline_pairs(cache: Path, data: str, s: ob.Settings, make: bool) -> tuple[str, float]:
    """The offline pairs of ``data`` (objectives_benchmark.py's on- or off-policy pair set, made
    once into the shared cache unless ``make`` is false) and the seconds it took to make them."""
    kind = data.removeprefix("offline_")
    if make:
        model = "toy" if kind == "on_policy" else str(ob.ensure_early_model(cache, s))
        ob.ensure_pairs(cache, kind, model, s)
    return (str(ob.pairs_folder(cache, kind, s) / "pairs.jsonl"),
            ob.pairs_seconds(cache, kind, s))


def build_specs(args, s: ob.Settings, base_images: Path) -> tuple[list[ob.RunSpec], dict]:
    """Every (seed, data, objective) run, whole seeds first; and each offline kind's pair cost
    (with --report-only nothing is made: the pairs and their costs are read as recorded)."""
    inputs, pair_cost = {}, {}
    for data in (d for d in OFFLINE if d in args.data):
        manifest, seconds = offline_pairs(args.cache, data, s, make=not args.report_only)
        inputs[data], pair_cost[data] = (manifest, ()), seconds
    for refresh in args.refresh if "online" in args.data else []:
        inputs[f"online_every_{refresh}"] = ("", online_overrides(refresh, s))
    specs = [ob.RunSpec(data, objective, args.beta, seed, pairs, str(args.runs), str(base_images),
                        s, extra)
             for seed in args.seeds for data, (pairs, extra) in inputs.items()
             for objective in OBJECTIVES]
    return specs, pair_cost


def cell_rows(rows: list[dict], pair_cost: dict) -> list[dict]:
    """objectives_benchmark's cells plus wall time and reward gain per wall-second, by seed."""
    cells = ob.aggregate(rows)
    for cell in cells:
        runs = [r for r in rows if (r["data"], r["variant"]) == (cell["data"], cell["variant"])]
        walls = {r["seed"]: r.get("train_s", r["wall_s"]) + pair_cost.get(r["data"], 0.0)
                 for r in runs}
        cell["run_wall_s"] = ob.spread(list(walls.values()))
        cell["gain_per_s"] = ob.spread([r["final"].get("reward_gain", math.nan) / walls[r["seed"]]
                                        for r in runs])
    return cells


def markdown_table(cells: list[dict]) -> str:
    lines = ["| objective | pairs | reward gain | win rate | fidelity (base → tuned) | wall s | "
             "gain per wall-s (x1000) | vs offline on-policy |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    reference = {c["variant"]: c for c in cells if c["data"] == REFERENCE}  # (absent: no verdict)
    for objective in OBJECTIVES:
        for c in sorted((c for c in cells if c["variant"] == objective), key=data_order):
            per_s = c["gain_per_s"]
            lines.append(
                f"| {objective} | {c['data'].replace('_', ' ')} | "
                f"{ob.fmt(c['reward_gain'], sign=True)} | {ob.fmt(c['win_rate'], 2)} | "
                f"{c['base_fidelity']['mean']:.2f} → {ob.fmt(c['tuned_fidelity'], 2)} | "
                f"{ob.fmt(c['run_wall_s'], 1)} | {1000 * per_s['mean']:+.2f} ± "
                f"{1000 * per_s['std']:.2f} | {ob.versus(c, reference.get(objective))} |")
    return "\n".join(lines) + "\n"


def data_order(cell: dict) -> tuple:
    kind = cell["data"]
    return (OFFLINE.index(kind), 0) if kind in OFFLINE else (2, int(kind.rsplit("_", 1)[1]))


def plot_curves(rows: list[dict], path: Path) -> Path:
    """Reward gain against steps: a panel per objective, a line per data kind (mean over seeds,
    min-max band)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    kinds = sorted({r["data"] for r in rows}, key=lambda k: data_order({"data": k}))
    fig, axes = plt.subplots(1, len(OBJECTIVES), figsize=(13, 3.6), sharey=True)
    for ax, objective in zip(axes, OBJECTIVES, strict=True):
        for i, kind in enumerate(kinds):
            group = [r for r in rows if (r["data"], r["variant"]) == (kind, objective) and r["curve"]]
            if not group:
                continue
            steps = [0] + sorted(int(k) for k in group[0]["curve"])
            gains = np.array([[0.0] + [r["curve"][str(k)]["reward_gain"] for k in steps[1:]]
                              for r in group])
            line, = ax.plot(steps, gains.mean(0), marker="os^vD"[i % 5], ms=3, label=kind,
                            ls=("-", "--", ":", "-.")[i % 4])
            ax.fill_between(steps, gains.min(0), gains.max(0), alpha=0.15, color=line.get_color())
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(objective)
        ax.set_xlabel("step")
    axes[0].set_ylabel("reward gain vs base (colour)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None):
    d = ob.Settings()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 30 steps, 64 pairs, 32 evaluation samples at steps 15 and 30, "
                   "the off-policy pairs from a shorter pretraining (100 VAE / 150 U-Net steps)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_online")
    p.add_argument("--cache", type=Path, default=ROOT / "outputs" / "bench_objectives" / "cache",
                   help="where the pairs, the early checkpoint and the base images are made once "
                   "(shared with objectives_benchmark.py and stress.py)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--refresh", type=int, nargs=2, default=[5, 20],
                   help="the two online refresh intervals, in steps")
    p.add_argument("--beta", type=float, default=1000.0, help="every objective's beta (the demo's)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--num-pairs", type=int, default=d.num_pairs)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--data", nargs="+", choices=(*OFFLINE, "online"),
                   default=[*OFFLINE, "online"], help="the data kinds run ('online': both intervals)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.num_pairs, args.eval_samples = args.seeds[:1], 30, 64, 32
        args.refresh = [5, 15]
    args.runs = args.out / ("quick" if args.quick else "full")
    return args


def main(argv=None) -> dict:
    from sipo_plugin.utils.io import atomic_write_text
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    start = time.time()
    s = replace(ob.Settings(), steps=args.steps, num_pairs=args.num_pairs,
                eval_samples=args.eval_samples, eval_points=2 if args.quick else 3)
    if args.quick:  # a shorter pretraining for the off-policy checkpoint: the whole quick mode,
        s = replace(s, **QUICK_EARLY_MODEL)  # inputs included, fits in 5 minutes
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        _, pair_cost = build_specs(args, s, Path())
        rows = [json.loads(p.read_text()) for p in sorted((args.runs / "runs").rglob("seed*.json"))]
    else:
        specs, pair_cost = build_specs(args, s, ob.ensure_base_images(args.cache, s))
        rows = ob.run_all(specs, args.workers)
    cells = cell_rows(rows, pair_cost)
    summary = {"settings": asdict(s), "seeds": args.seeds, "refresh": args.refresh,
               "beta": args.beta, "pair_cost_s": pair_cost, "wall_s": round(time.time() - start, 1),
               "load_avg": os.getloadavg(), "runs": len(rows), "cells": cells}
    atomic_write_text(args.runs / "results.json", json.dumps(summary, indent=1))
    table = markdown_table(cells)
    atomic_write_text(args.runs / "summary.md", table)
    plot = plot_curves(rows, args.runs / "reward_curves.png")
    print(table)
    print(f"{len(rows)} runs in {summary['wall_s']} s (load average "
          f"{', '.join(f'{x:.1f}' for x in summary['load_avg'])}); {args.runs / 'results.json'}, "
          f"{plot}")
    return summary


if __name__ == "__main__":
    main()
