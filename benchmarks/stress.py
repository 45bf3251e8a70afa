"""Stability under stress on the toy world: long runs, high learning rate and beta, no SFT term.

    nice -n 10 .venv/bin/python benchmarks/stress.py            # full: 5 objectives x 3 data x 3 seeds
    nice -n 10 .venv/bin/python benchmarks/stress.py --quick    # on-policy, 1 seed, 120 steps (< 5 min)
    nice -n 10 .venv/bin/python benchmarks/stress.py --variants diffusion-dpo --seeds 0 \\
        --learning-rates 1e-3 3e-3 1e-2 --betas 5000 20000     # probe settings (a grid)
    ... --report-only                                           # aggregate the runs written so far

Question: does plain Diffusion-DPO degrade where DPO-C&M and SIPO do not? Every run trains a LoRA
on the bundled toy model with the project's trainer, as ``objectives_benchmark.py`` does (same pair
data, early checkpoint, evaluation set and helpers, imported from it), but with ``sft_weight = 0``
for every objective, several hundred steps, and a grid of learning rates and betas. Variants:

- ``diffusion-dpo``; ``dpo-cm`` and ``sipo`` (defaults: kappa "auto", tau 0.9, clip_eps 0.1);
- ``sipo-wide``: SIPO with clip_eps 0.5 and mask_threshold 0.5. The step-wise weights are <= 1,
  so with tau 0.9 every kept weight lies in [0.9, 1] and no clip_eps changes anything: the mask
  must be lowered too before SIPO's per-side weights can differ from DPO-C&M's shared one;
- ``sipo-1427``: sd-scripts PR #1427's reading (``sipo_plugin/objectives/sipo_1427.py``).

**Collapse** (per run): a non-finite loss, OR a final prompt fidelity more than ``--fidelity-drop``
(0.10, absolute) below the base model's, OR a final reward gain below zero (the tuned model ends
worse than the base it started from on the reward it was trained for). Also reported: the reward
gain at the end and at its best over the evaluation points, the drop from best to end, the
largest fall below the best so far (a dip the run recovered from counts), and the per-step gradient
norm before clipping (each run's mean, standard deviation and maximum).

Runs are resumable (``<out>/{full,quick}/runs/<data>/<variant>/lr<lr>_beta<beta>/seed<s>.json``);
the aggregate goes to ``results.json`` and ``summary.md`` beside ``runs/``. Inputs (pairs, the
off-policy checkpoint, the base model's evaluation images) are shared with the objectives benchmark
through ``--cache`` (default ``outputs/bench_objectives/cache``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import objectives_benchmark as ob  # noqa: E402  (the toy benchmark's inputs and evaluation)
from online import online_overrides  # noqa: E402  (the online benchmark's [online] settings)

DATA_KINDS = [*ob.DATA_KINDS, "online"]

# variant -> (registered objective, fixed hyper-parameters); every variant runs with sft_weight 0
VARIANTS = {
    "diffusion-dpo": ("diffusion-dpo", {}),
    "dpo-cm": ("dpo-cm", {}),
    "sipo": ("sipo", {}),
    "sipo-wide": ("sipo", {"clip_eps": 0.5, "mask_threshold": 0.5}),
    "sipo-1427": ("sipo-1427", {}),
}
LAST_METRICS = ("train/mask_fraction", "train/weights/chosen", "train/weights/rejected",
                "train/weights/shared", "train/weights/clipped_fraction", "train/implicit_acc")


@dataclass(frozen=True)
class StressSpec:
    """One run; ``settings.learning_rate`` is the run's learning rate."""

    data: str
    variant: str
    beta: float
    seed: int
    pairs: str
    out: str
    base_images: str
    settings: ob.Settings
    max_grad_norm: float = 1.0
    extra: tuple[str, ...] = ()  # more overrides (online data: the [online] settings)

    @property
    def result_path(self) -> Path:
        cell = f"lr{self.settings.learning_rate:g}_beta{self.beta:g}"
        if self.max_grad_norm != 1.0:
            cell += f"_clip{self.max_grad_norm:g}"
        return Path(self.out) / "runs" / self.data / self.variant / cell / f"seed{self.seed}.json"


def objective_overrides(variant: str, beta: float) -> list[str]:
    """``--objective NAME --beta B --sft_weight 0`` plus the variant's fixed hyper-parameters."""
    name, fixed = VARIANTS[variant]
    out = ["--objective", name]
    for key, value in {"beta": float(beta), "sft_weight": 0.0, **fixed}.items():
        out += [f"--{key}", json.dumps(value)]
    return out


def run_config(spec: StressSpec):
    from sipo_plugin.training.config import load_config

    s = spec.settings
    return load_config(None, [
        "--train_data", spec.pairs, "--output_dir", str(spec.result_path.with_suffix("")),
        "--resolution", "32", "--seed", str(spec.seed), "--learning_rate", str(s.learning_rate),
        "--max_train_steps", str(s.steps), "--train_batch_size", str(s.batch),
        "--logging_steps", str(s.steps), "--eval_samples", str(s.eval_samples),
        "--max_grad_norm", str(spec.max_grad_norm), "--overwrite", "true",
        *objective_overrides(spec.variant, spec.beta), *spec.extra])


def collapse_reasons(nonfinite: bool, final: dict, fidelity_drop: float) -> list[str]:
    """Why a run counts as collapsed (empty: it did not): the three rules of the docstring."""
    reasons = ["non-finite loss"] if nonfinite else []
    drop = final.get("base_fidelity", math.nan) - final.get("tuned_fidelity", math.nan)
    if not nonfinite and not drop <= fidelity_drop:
        reasons.append(f"fidelity -{drop:.2f}")
    gain = final.get("reward_gain", math.nan)
    if not nonfinite and not gain >= 0:
        reasons.append(f"reward gain {gain:+.3f}")
    return reasons


def run_one(spec: StressSpec) -> dict:
    """Train with the step recorder, evaluate the LoRA at the snapshot steps, write the JSON."""
    import torch

    from sipo_plugin.utils.io import atomic_write_text

    torch.set_num_threads(1)
    start, cpu_start = time.time(), time.process_time()
    config = run_config(spec)
    result, error, recorder, curve = ob.train_and_evaluate(spec, config)
    final = curve[max(curve)] if curve else {}
    gains = [point["reward_gain"] for point in curve.values()]
    nonfinite = bool(error) or not all(math.isfinite(v) for v in recorder.losses)
    reasons = collapse_reasons(nonfinite, final, spec.settings.fidelity_drop)
    norms = recorder.grad_norms
    row = {
        "data": spec.data, "variant": spec.variant, "objective": VARIANTS[spec.variant][0],
        "beta": spec.beta, "learning_rate": spec.settings.learning_rate, "seed": spec.seed,
        "max_grad_norm": spec.max_grad_norm, "settings": asdict(spec.settings),
        "objective_hyperparameters": result.objective.hyperparameters() if result else {},
        "final": final, "curve": {str(k): v for k, v in curve.items()},
        "best_gain": max(gains) if gains else math.nan,
        "best_step": max(curve, key=lambda k: curve[k]["reward_gain"]) if curve else None,
        "loss": ob.spread(recorder.losses), "grad_norm": ob.spread(norms),
        "loss_by_step": recorder.losses, "grad_norm_by_step": norms,
        "nonfinite": nonfinite, "error": error, "collapsed": bool(reasons),
        "collapse_reasons": reasons, "wall_s": round(time.time() - start, 1),
        "cpu_s": round(time.process_time() - cpu_start, 1),
        "last_metrics": {k: result.last_metrics.get(k) for k in LAST_METRICS} if result else {},
    }
    spec.result_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec.result_path, json.dumps(row, indent=1))
    return row


def report_progress(row: dict, done: int, total: int, start: float) -> None:
    gain = row["final"].get("reward_gain", math.nan)
    print(f"[{done}/{total} {time.time() - start:6.0f}s] {row['data']:10s} {row['variant']:13s} "
          f"lr={row['learning_rate']:g} beta={row['beta']:g} seed={row['seed']}: end {gain:+.4f} "
          f"best {row['best_gain']:+.4f} grad {row['grad_norm']['mean']:.3g}"
          f"{' COLLAPSED: ' + ', '.join(row['collapse_reasons']) if row['collapsed'] else ''} "
          f"({row['wall_s']} s)", flush=True)


def largest_fall(curve: dict) -> float:
    """The largest drop of the reward gain below its best so far over the evaluation points
    (0 for a curve that never falls): a run that dips and recovers shows here, not in the end."""
    best, fall = -math.inf, 0.0
    for step in sorted(curve, key=int):
        gain = curve[step]["reward_gain"]
        best = max(best, gain)
        fall = max(fall, best - gain)
    return fall


def cell_key(row: dict) -> tuple:
    return (row["data"], row["variant"], row["learning_rate"], row["beta"],
            row.get("max_grad_norm", 1.0))


def aggregate(rows: list[dict]) -> list[dict]:
    """One cell per (data, variant, learning rate, beta, clip): spreads over seeds."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault(cell_key(row), []).append(row)
    out = []
    for (data, variant, lr, beta, clip), runs in cells.items():
        finals = [r["final"] for r in runs]
        out.append({
            "data": data, "variant": variant, "learning_rate": lr, "beta": beta,
            "max_grad_norm": clip, "seeds": sorted(r["seed"] for r in runs),
            "collapsed": sum(r["collapsed"] for r in runs), "n": len(runs),
            "collapse_reasons": {str(r["seed"]): r["collapse_reasons"] for r in runs},
            "reward_gain": ob.spread([f.get("reward_gain", math.nan) for f in finals]),
            "reward_se": ob.spread([f.get("reward_se", math.nan) for f in finals]),
            "gain_by_seed": {str(r["seed"]): r["final"].get("reward_gain", math.nan) for r in runs},
            "best_gain": ob.spread([r["best_gain"] for r in runs]),
            "drop_from_best": ob.spread([r["best_gain"] - r["final"].get("reward_gain", math.nan)
                                         for r in runs]),
            "largest_fall": ob.spread([largest_fall(r["curve"]) for r in runs]),
            "tuned_fidelity": ob.spread([f.get("tuned_fidelity", math.nan) for f in finals]),
            "base_fidelity": ob.spread([f.get("base_fidelity", math.nan) for f in finals]),
            "grad_norm_mean": ob.spread([r["grad_norm"]["mean"] for r in runs]),
            "grad_norm_std": ob.spread([r["grad_norm"]["std"] for r in runs]),
            "grad_norm_max": ob.spread([r["grad_norm"]["max"] for r in runs]),
            "loss_max": ob.spread([r["loss"]["max"] for r in runs]),
            "wall_s": ob.spread([r["wall_s"] for r in runs]),
            "cpu_s": ob.spread([r.get("cpu_s", math.nan) for r in runs]),
        })
    order = list(VARIANTS)
    out.sort(key=lambda c: (c["data"], c["learning_rate"], c["beta"], c["max_grad_norm"],
                            order.index(c["variant"])))
    return out


def markdown_table(cells: list[dict]) -> str:
    """One table; each row against Diffusion-DPO in the same (data, lr, beta, clip) cell."""
    dpo = {(c["data"], c["learning_rate"], c["beta"], c["max_grad_norm"]): c for c in cells
           if c["variant"] == "diffusion-dpo"}
    lines = ["| data | objective | lr | beta | collapse | reward gain, end | reward gain, best | "
             "drop from best | largest fall | fidelity, end | grad norm: mean / std / max | "
             "end vs diffusion-dpo |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in cells:
        ref = dpo.get((c["data"], c["learning_rate"], c["beta"], c["max_grad_norm"]))
        clip = "" if c["max_grad_norm"] == 1.0 else f" (clip {c['max_grad_norm']:g})"
        lines.append(
            f"| {c['data'].replace('_', '-')} | {c['variant']}{clip} | {c['learning_rate']:g} | "
            f"{c['beta']:g} | {c['collapsed']}/{c['n']} | {ob.fmt(c['reward_gain'], sign=True)} | "
            f"{ob.fmt(c['best_gain'], sign=True)} | {ob.fmt(c['drop_from_best'])} | "
            f"{ob.fmt(c['largest_fall'])} | "
            f"{c['base_fidelity']['mean']:.2f} → {ob.fmt(c['tuned_fidelity'], 2)} | "
            f"{c['grad_norm_mean']['mean']:.3g} / {c['grad_norm_std']['mean']:.3g} / "
            f"{c['grad_norm_max']['mean']:.3g} | {ob.versus(c, ref)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="on-policy only, 1 seed, 120 steps, 32 evaluation samples (< 5 min)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_stress")
    p.add_argument("--cache", type=Path, default=ROOT / "outputs" / "bench_objectives" / "cache",
                   help="pairs, off-policy checkpoint and base images (shared, made once)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--learning-rates", type=float, nargs="+", default=[3e-3])
    p.add_argument("--betas", type=float, nargs="+", default=[20000.0])
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="the trainer's gradient clipping (the norm is recorded before it)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--data", nargs="+", default=DATA_KINDS, choices=DATA_KINDS)
    p.add_argument("--refresh", type=int, default=20,
                   help="online data: the pairs refreshed from the policy every N steps")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--num-pairs", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--eval-points", type=int, default=6)
    p.add_argument("--eval-inference-steps", type=int, default=10)
    p.add_argument("--fidelity-drop", type=float, default=0.10)
    p.add_argument("--report-only", action="store_true",
                   help="aggregate the runs already written (e.g. of a benchmark cut short)")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.seeds = ["on_policy"], args.seeds[:1]
        args.steps, args.eval_samples, args.eval_points = 120, 32, 2
    args.runs = args.out / ("quick" if args.quick else "full")
    return args


def build_specs(args, s: ob.Settings, inputs: dict, base_images: Path) -> list[StressSpec]:
    """The grid, seed-major so that a benchmark cut short has whole seeds of every objective;
    ``inputs`` maps each data kind to its (pairs manifest, extra overrides)."""
    return [StressSpec(data, variant, beta, seed, inputs[data][0], str(args.runs),
                       str(base_images), replace(s, learning_rate=lr), args.max_grad_norm,
                       inputs[data][1])
            for seed in args.seeds for data in args.data for lr in args.learning_rates
            for beta in args.betas for variant in args.variants]


def data_inputs(args, s: ob.Settings) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each data kind's (pairs manifest, extra overrides): offline pairs made once into the
    cache; online runs sample theirs from the policy (online.py's settings, as many prompt slots
    in all as the offline pairs hold)."""
    models = {"on_policy": "toy"}
    if "off_policy" in args.data:
        models["off_policy"] = str(ob.ensure_early_model(args.cache, s))
    inputs = {data: (str(ob.ensure_pairs(args.cache, data, models[data], s)), ())
              for data in args.data if data in models}
    if "online" in args.data:
        inputs["online"] = ("", online_overrides(args.refresh, s))
    return inputs


def main(argv: list[str] | None = None) -> dict:
    from sipo_plugin.utils.io import atomic_write_text

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    start = time.time()
    s = ob.Settings(steps=args.steps, batch=args.batch, num_pairs=args.num_pairs,
                    eval_samples=args.eval_samples, eval_points=args.eval_points,
                    eval_inference_steps=args.eval_inference_steps,
                    fidelity_drop=args.fidelity_drop)
    args.runs.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        rows = [json.loads(p.read_text()) for p in sorted((args.runs / "runs").rglob("seed*.json"))]
    else:
        args.cache.mkdir(parents=True, exist_ok=True)
        inputs = data_inputs(args, s)
        base_images = ob.ensure_base_images(args.cache, s)
        specs = build_specs(args, s, inputs, base_images)
        rows = ob.run_all(specs, args.workers, run=run_one, report=report_progress)
    cells = aggregate(rows)
    summary = {"settings": asdict(s), "argv": sys.argv[1:] if argv is None else argv,
               "wall_s": round(time.time() - start, 1), "load_avg": os.getloadavg(),
               "runs": len(rows), "cells": cells}
    atomic_write_text(args.runs / "results.json", json.dumps(summary, indent=1))
    table = markdown_table(cells)
    atomic_write_text(args.runs / "summary.md", table)
    print(table)
    print(f"{len(rows)} runs in {summary['wall_s']} s (load average "
          f"{', '.join(f'{x:.1f}' for x in summary['load_avg'])}); {args.runs / 'results.json'}")
    return summary


if __name__ == "__main__":
    main()
