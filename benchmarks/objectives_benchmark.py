"""Objectives on the toy world: reward gain, win rate, fidelity, stability, collapse; seeds x betas.

    python benchmarks/objectives_benchmark.py            # full grid: 114 runs, 2 worker processes
    python benchmarks/objectives_benchmark.py --quick    # 1 seed, beta 5000, 30 steps: 10 runs
    python benchmarks/objectives_benchmark.py --report-only   # aggregate the runs written so far

Every run trains a LoRA on the bundled toy model with the project's own trainer
(``sipo_plugin.training.loop.train``) and is evaluated against that model on a fixed prompt x seed
set with the toy world's paired evaluation (``sipo_plugin.toy.evaluate``). Two kinds of pair data:

- ``on_policy``: pairs sampled from the bundled toy model itself (the reference model);
- ``off_policy``: pairs sampled from an early checkpoint of the toy pretraining (made once with
  ``python -m sipo_plugin.toy.pretrain`` and cached under the output folder), trained and evaluated
  against the bundled model as base.

Runs are independent processes of one thread each (``--workers``, default 2); each writes
``<out>/{full,quick}/runs/<data>/<variant>/beta<beta>/seed<seed>.json`` and is skipped when that
file exists with the same settings, so an interrupted benchmark resumes. The aggregate goes to
``results.json``, ``summary.md`` and ``reward_curves_<data>.png`` (mean over seeds with a min-max
band) beside ``runs/``. Pairs, the off-policy checkpoint and the base model's evaluation samples are
made once into ``<out>/cache`` and shared by both modes.

A run counts as collapsed when its loss became non-finite or its final prompt fidelity fell more
than ``--fidelity-drop`` (default 0.10, absolute) below the base model's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

TOY_GUIDANCE = 3.0  # the demo's guidance for pairs and evaluation

# variant -> (registered objective, fixed hyper-parameters, takes beta)
VARIANTS = {
    "sft": ("sft", {}, False),
    "diffusion-dpo": ("diffusion-dpo", {}, True),
    "dpo-cm": ("dpo-cm", {}, True),
    "sipo": ("sipo", {}, True),
    "sipo-shared-max": ("sipo", {"pair_weight": "shared_max"}, True),
    "diffusion-dpo-nosft": ("diffusion-dpo", {"sft_weight": 0.0}, True),
    "sipo-nosft": ("sipo", {"sft_weight": 0.0}, True),
    "dpo-cm-skip": ("dpo-cm", {}, True),  # + skip_masked_timesteps (TRAINING_OVERRIDES)
    "sipo-skip": ("sipo", {}, True),
}
# variant -> [training] overrides; these variants run only when named (--variants)
TRAINING_OVERRIDES = {"dpo-cm-skip": ["--skip_masked_timesteps", "true"],
                      "sipo-skip": ["--skip_masked_timesteps", "true"]}
DATA_KINDS = ("on_policy", "off_policy")
PAIRS_SECONDS = "pairs_seconds.json"  # beside a pair set: how long making it took
SFT_PER_BETA = 1.0 / 5000.0  # the demo's sft_weight 1.0 at beta 5000, kept proportional to beta


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on (stored in every run's JSON)."""

    steps: int = 60
    batch: int = 4
    learning_rate: float = 1e-3
    num_pairs: int = 128
    eval_samples: int = 64
    eval_points: int = 3  # evaluations during training, evenly spaced, the last at the end
    eval_inference_steps: int = 10  # DDIM steps of the evaluation samples (pairs use 20)
    fidelity_drop: float = 0.10
    early_vae_steps: int = 400
    early_unet_steps: int = 600
    early_images: int = 4000


@dataclass(frozen=True)
class RunSpec:
    data: str
    variant: str
    beta: float | None
    seed: int
    pairs: str
    out: str
    base_images: str
    settings: Settings
    extra: tuple[str, ...] = ()  # more command-line overrides (benchmarks/online.py: [online])

    @property
    def result_path(self) -> Path:
        beta = "none" if self.beta is None else f"{self.beta:g}"
        folder = Path(self.out) / "runs" / self.data / self.variant / f"beta{beta}"
        return folder / f"seed{self.seed}.json"


def objective_overrides(variant: str, beta: float | None) -> list[str]:
    """Command-line overrides of the variant's objective: beta, and sft_weight = beta / 5000."""
    name, fixed, takes_beta = VARIANTS[variant]
    hp = {}
    if takes_beta:
        hp = {"beta": float(beta), "sft_weight": SFT_PER_BETA * float(beta)}
    hp.update(fixed)
    out = ["--objective", name]
    for key, value in hp.items():
        out += [f"--{key}", json.dumps(value)]
    return out


def eval_steps(steps: int, points: int) -> list[int]:
    """``points`` evenly spaced steps ending at ``steps``: 90, 3 -> [30, 60, 90]."""
    return sorted({max(1, round(steps * (i + 1) / points)) for i in range(points)})


def spread(values: list[float]) -> dict:
    """Mean, sample std (0 for one value), min and max of the finite values (NaN when none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "min": min(finite), "max": max(finite),
            "n": len(finite)}


# --------------------------------------------------------------------------------------------
# one run (in a worker process)


class StepRecorder:
    """Wraps ``loop.train_step``: per-step loss, pre-clip gradient norm, LoRA snapshots at steps."""

    def __init__(self, snapshot_steps: list[int]):
        self.snapshot_steps = set(snapshot_steps)
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.snapshots: dict[int, dict] = {}
        self.train_s = 0.0  # seconds in loop.train (set by train_and_evaluate)

    def wrap(self, train_step):
        from accelerate import Accelerator

        from sipo_plugin.models.base import ModelAdapter
        from sipo_plugin.training.loop import lora_state

        def recorded_step(*args, **kwargs):
            accelerator = next(a for a in args if isinstance(a, Accelerator))
            adapter = next(a for a in args if isinstance(a, ModelAdapter))
            if not getattr(accelerator, "_benchmark_hooked", False):
                clip = accelerator.clip_grad_norm_

                def clip_and_record(parameters, max_norm, *a, **kw):
                    norm = clip(parameters, max_norm, *a, **kw)
                    self.grad_norms.append(float(norm))
                    return norm

                accelerator.clip_grad_norm_ = clip_and_record
                accelerator._benchmark_hooked = True
            metrics = train_step(*args, **kwargs)
            self.losses.append(float(metrics["loss"]))
            if len(self.losses) in self.snapshot_steps:
                self.snapshots[len(self.losses)] = lora_state(adapter)
            return metrics

        return recorded_step


def run_config(spec: RunSpec):
    from sipo_plugin.training.config import load_config

    s = spec.settings
    run_dir = spec.result_path.with_suffix("")
    overrides = [
        "--train_data", spec.pairs, "--output_dir", str(run_dir), "--resolution", "32",
        "--seed", str(spec.seed), "--learning_rate", str(s.learning_rate),
        "--max_train_steps", str(s.steps), "--train_batch_size", str(s.batch),
        "--logging_steps", str(s.steps), "--eval_samples", str(s.eval_samples),
        "--overwrite", "true",  # a rerun (after an interruption) replaces the unfinished run
        *objective_overrides(spec.variant, spec.beta), *TRAINING_OVERRIDES.get(spec.variant, []),
        *spec.extra]
    return load_config(None, overrides)


def evaluate_snapshots(spec: RunSpec, config, result, snapshots: dict) -> dict[int, dict]:
    """Toy evaluation of each LoRA snapshot against the cached base images (same prompt x seed)."""
    from sipo_plugin.toy.evaluate import eval_set, evaluate
    from sipo_plugin.toy.pipeline import sample_images
    from sipo_plugin.training.loop import load_lora_state

    base = load_images(spec.base_images)
    prompts, seeds = eval_set(config.evaluate.eval_samples)
    pipe = result.adapter.sampling_pipeline()
    out = {}
    for step, state in sorted(snapshots.items()):
        load_lora_state(result.adapter, state)
        tuned = sample_images(pipe, prompts, seeds, guidance_scale=TOY_GUIDANCE,
                              num_inference_steps=spec.settings.eval_inference_steps)
        out[step] = evaluate(base, tuned, prompts, "colour")
    return out


def first_timestep(config) -> int:
    """The smallest timestep the run drew (skip_masked_timesteps; 0 otherwise), from its log."""
    log = Path(config.training.output_dir) / "metrics.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return next((e["first_timestep"] for e in events if e.get("event") == "skip_masked_timesteps"),
                0)


def train_and_evaluate(spec, config):
    """``(result, error, recorder, curve)``: train ``config`` with a :class:`StepRecorder`, then
    evaluate the LoRA at the snapshot steps (``result`` None and ``error`` set on a non-finite
    loss; ``curve`` maps step -> toy evaluation)."""
    from sipo_plugin.training import loop

    recorder = StepRecorder(eval_steps(spec.settings.steps, spec.settings.eval_points))
    original = loop.train_step
    loop.train_step = recorder.wrap(original)
    error = ""
    trained_at = time.time()
    try:
        result = loop.train(config)
    except loop.NonFiniteLossError as err:
        result, error = None, str(err)
    finally:
        loop.train_step = original
    recorder.train_s = time.time() - trained_at  # training only (online: with its sampling)
    curve = evaluate_snapshots(spec, config, result, recorder.snapshots) if result else {}
    return result, error, recorder, curve


def run_one(spec: RunSpec) -> dict:
    """Train, evaluate at the snapshot steps, write and return the run's JSON."""
    import torch

    from sipo_plugin.utils.io import atomic_write_text

    torch.set_num_threads(1)
    start = time.time()
    config = run_config(spec)
    result, error, recorder, curve = train_and_evaluate(spec, config)
    final = curve[max(curve)] if curve else {}
    nonfinite = bool(error) or not all(math.isfinite(v) for v in recorder.losses)
    fid_drop = final.get("base_fidelity", math.nan) - final.get("tuned_fidelity", math.nan)
    row = {
        "data": spec.data, "variant": spec.variant, "objective": VARIANTS[spec.variant][0],
        "beta": spec.beta, "seed": spec.seed, "settings": asdict(spec.settings),
        "objective_hyperparameters": result.objective.hyperparameters() if result else {},
        "final": final, "curve": {str(k): v for k, v in curve.items()},
        "loss": spread(recorder.losses), "grad_norm": spread(recorder.grad_norms),
        "loss_by_step": recorder.losses, "grad_norm_by_step": recorder.grad_norms,
        "nonfinite": nonfinite, "error": error,
        "collapsed": nonfinite or not fid_drop <= spec.settings.fidelity_drop,
        "wall_s": round(time.time() - start, 1), "train_s": round(recorder.train_s, 1),
        "mask_fraction": result.last_metrics.get("train/mask_fraction") if result else None,
        "first_timestep": first_timestep(config),
    }
    spec.result_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec.result_path, json.dumps(row, indent=1))
    return row


# --------------------------------------------------------------------------------------------
# shared inputs: pairs, the off-policy checkpoint, the base model's evaluation images


def ensure_early_model(out: Path, s: Settings) -> Path:
    """An early checkpoint of the toy pretraining (fewer steps, fewer images), made once."""
    folder = out / f"early_toy_model_v{s.early_vae_steps}_u{s.early_unet_steps}_n{s.early_images}"
    if (folder / "model_index.json").is_file():
        return folder
    print(f"pretraining the off-policy toy checkpoint into {folder} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "sipo_plugin.toy.pretrain", "--out", str(folder),
                    "--vae-steps", str(s.early_vae_steps), "--unet-steps", str(s.early_unet_steps),
                    "--n-images", str(s.early_images), "--log-every", "200"],
                   check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return folder


def pairs_folder(out: Path, data: str, s: Settings) -> Path:
    return out / "pairs" / f"{data}_{s.num_pairs}"


def pairs_seconds(out: Path, data: str, s: Settings) -> float:
    """The seconds ``ensure_pairs`` took to make the pairs of ``data`` (NaN: not recorded)."""
    record = pairs_folder(out, data, s) / PAIRS_SECONDS
    return json.loads(record.read_text())["pairs_s"] if record.is_file() else math.nan


def ensure_pairs(out: Path, data: str, pair_model: str, s: Settings) -> Path:
    """Pair data of one kind through the trainer's [pairs] path: the toy prompts, two candidates
    each from ``pair_model``, labelled by the colour reward (resumable: reused when present; the
    seconds it took to make them are recorded beside them, for ``pairs_seconds``)."""
    from sipo_plugin.pairs.onpolicy import make_training_pairs
    from sipo_plugin.training.config import load_config
    from sipo_plugin.utils.io import atomic_write_text

    folder = pairs_folder(out, data, s)
    made_now, started = not (folder / "pairs.jsonl").is_file(), time.time()
    config = load_config(None, [
        "--train_data", str(folder / "pairs.jsonl"), "--pretrained_model_name_or_path", pair_model,
        "--pairs_prompts", "toy", "--num_prompts", str(s.num_pairs), "--candidates", "2",
        "--rewards", '["colour"]', "--candidates_dir", str(folder / "candidates"),
        "--sampler", "ddim", "--sampler_steps", "20", "--guidance_scale", str(TOY_GUIDANCE),
        "--sample_batch_size", "64"])
    manifest = make_training_pairs(config)
    if made_now:
        atomic_write_text(folder / PAIRS_SECONDS,
                          json.dumps({"pairs_s": round(time.time() - started, 1)}))
    return manifest


def load_images(path: str):
    from safetensors.numpy import load_file
    return load_file(path)["images"]


def ensure_base_images(out: Path, s: Settings) -> Path:
    """The bundled model's samples on the evaluation set: identical for every run, made once."""
    import numpy as np

    from sipo_plugin.toy.evaluate import eval_set
    from sipo_plugin.toy.pipeline import load_toy_pipeline, sample_images
    from sipo_plugin.utils.io import atomic_write_bytes

    path = out / f"base_eval_{s.eval_samples}_{s.eval_inference_steps}steps.safetensors"
    if path.is_file():
        return path
    from safetensors.numpy import save
    prompts, seeds = eval_set(s.eval_samples)
    images = sample_images(load_toy_pipeline(), prompts, seeds, guidance_scale=TOY_GUIDANCE,
                           num_inference_steps=s.eval_inference_steps)
    atomic_write_bytes(path, save({"images": np.ascontiguousarray(images)}))
    return path


# --------------------------------------------------------------------------------------------
# the grid, the pool, the aggregate


def tier(variant: str) -> int:
    """Run order: the four objectives first, then the SIPO variant, then the ablations."""
    return 2 if variant.endswith("-nosft") else 1 if variant == "sipo-shared-max" else 0


def build_specs(args, s: Settings, inputs: dict[str, Path], base_images: Path) -> list[RunSpec]:
    """The grid, ordered so that a benchmark cut short has whole seeds of the main objectives."""
    specs = []
    for level in (0, 1, 2):
        for seed in args.seeds:
            for data in args.data:
                for variant in (v for v in args.variants if tier(v) == level):
                    betas = args.betas if VARIANTS[variant][2] else [None]
                    if variant.endswith("-nosft"):
                        betas = [b for b in betas if b == args.ablation_beta]
                    for beta in betas:
                        specs.append(RunSpec(data, variant, beta, seed, str(inputs[data]),
                                             str(args.runs), str(base_images), s))
    return specs


def run_all(specs: list[RunSpec], workers: int, run=None, report=None) -> list[dict]:
    """Runs every spec not already written with the same settings on ``workers`` processes;
    ``run(spec) -> row`` and ``report(row, done, total, start)`` default to this benchmark's."""
    run, report = run or run_one, report or report_progress
    rows, todo = [], []
    for spec in specs:
        done = json.loads(spec.result_path.read_text()) if spec.result_path.is_file() else None
        if done is not None and done["settings"] == asdict(spec.settings):
            rows.append(done)
        else:
            todo.append(spec)
    print(f"{len(specs)} runs, {len(rows)} already done, {len(todo)} to run on {workers} "
          "worker(s)", flush=True)
    start = time.time()
    if workers <= 1:
        for i, spec in enumerate(todo):
            rows.append(run(spec))
            report(rows[-1], i + 1, len(todo), start)
        return rows
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # no max_tasks_per_child: Python 3.11's pool can hang when it replaces a retired worker
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run, spec): spec for spec in todo}
        for i, future in enumerate(as_completed(futures)):
            try:
                rows.append(future.result())
            except Exception as err:  # one broken run must not lose the others; rerun resumes
                spec = futures[future]
                print(f"FAILED {spec.data} {spec.variant} beta={spec.beta} seed={spec.seed}: "
                      f"{type(err).__name__}: {err}", flush=True)
                continue
            report(rows[-1], i + 1, len(todo), start)
    return rows


def report_progress(row: dict, done: int, total: int, start: float) -> None:
    gain = row["final"].get("reward_gain", math.nan)
    print(f"[{done}/{total} {time.time() - start:6.0f}s] {row['data']:10s} {row['variant']:20s} "
          f"beta={row['beta']} seed={row['seed']}: gain {gain:+.4f} "
          f"{'COLLAPSED ' if row['collapsed'] else ''}({row['wall_s']} s)", flush=True)


def aggregate(rows: list[dict]) -> list[dict]:
    """One cell per (data, variant, beta): mean/std/min/max over seeds of every headline number."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["data"], row["variant"], row["beta"]), []).append(row)
    out = []
    for (data, variant, beta), runs in cells.items():
        finals = [r["final"] for r in runs]
        out.append({
            "data": data, "variant": variant, "beta": beta,
            "seeds": sorted(r["seed"] for r in runs),
            "reward_gain": spread([f.get("reward_gain", math.nan) for f in finals]),
            "reward_se": spread([f.get("reward_se", math.nan) for f in finals]),
            "gain_by_seed": {str(r["seed"]): r["final"].get("reward_gain", math.nan) for r in runs},
            "win_rate": spread([f.get("win_rate", math.nan) for f in finals]),
            "tuned_fidelity": spread([f.get("tuned_fidelity", math.nan) for f in finals]),
            "base_fidelity": spread([f.get("base_fidelity", math.nan) for f in finals]),
            "loss_std": spread([r["loss"]["std"] for r in runs]),
            "grad_norm_mean": spread([r["grad_norm"]["mean"] for r in runs]),
            "grad_norm_std": spread([r["grad_norm"]["std"] for r in runs]),
            "collapse_rate": sum(r["collapsed"] for r in runs) / len(runs),
            "wall_s": spread([r["wall_s"] for r in runs]),
            "mask_fraction": spread([r.get("mask_fraction") for r in runs]),
            "first_timestep": spread([r.get("first_timestep", 0) for r in runs]),
        })
    variant_order = list(VARIANTS)
    out.sort(key=lambda c: (c["data"], variant_order.index(c["variant"]), c["beta"] or 0))
    return out


def fmt(stat: dict, digits: int = 4, sign: bool = False) -> str:
    if stat["n"] == 0:
        return "NaN"
    spec = f"{'+' if sign else ''}.{digits}f"
    return f"{stat['mean']:{spec}} ± {stat['std']:.{digits}f}"


# two-sided 95% Student-t quantiles by degrees of freedom (normal beyond 10)
T_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def paired_difference(a: dict, b: dict) -> tuple[float, float, float]:
    """Mean and standard error of gain(a) - gain(b), and the 95% critical ratio for it.

    Runs with the same seed share data order, noise draws and LoRA initialisation, so with two or
    more common seeds the difference is paired: mean and ``std / sqrt(n)`` of the per-seed
    differences. Otherwise the runs' own evaluation standard errors combine.
    """
    seeds = [k for k in a["gain_by_seed"] if k in b["gain_by_seed"]]
    diffs = [a["gain_by_seed"][k] - b["gain_by_seed"][k] for k in seeds]
    diffs = [d for d in diffs if math.isfinite(d)]
    if len(diffs) >= 2:
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        return statistics.fmean(diffs), se, T_95.get(len(diffs) - 1, 1.96)
    delta = a["reward_gain"]["mean"] - b["reward_gain"]["mean"]
    return delta, math.sqrt(a["reward_se"]["mean"] ** 2 + b["reward_se"]["mean"] ** 2), 1.96


def versus(cell: dict, ref: dict | None) -> str:
    """'better' / 'worse' when the (paired) difference is significant at 95% (t test), else
    'tie'."""
    if ref is None or cell is ref or ref["reward_gain"]["n"] == 0:
        return ""
    delta, se, critical = paired_difference(cell, ref)
    if not math.isfinite(delta):
        return ""
    verdict = "better" if delta > critical * se else "worse" if delta < -critical * se else "tie"
    return f"{delta:+.4f} ± {se:.4f} ({verdict})"


def markdown_tables(cells: list[dict]) -> str:
    """One table per data kind; each row against Diffusion-DPO at its beta (the same beta's
    cell; SFT, which has no beta, against Diffusion-DPO's best beta)."""
    lines = []
    dpo = {(c["data"], c["beta"]): c for c in cells if c["variant"] == "diffusion-dpo"}
    for data in sorted({c["data"] for c in cells}):
        lines += [f"### {data.replace('_', '-')} pairs", "",
                  "| objective | beta | reward gain | win rate | fidelity (base → tuned) | "
                  "loss std | grad norm (mean ± std) | collapse | vs diffusion-dpo |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        best_dpo = max((v for (d, _), v in dpo.items() if d == data), default=None,
                       key=lambda v: v["reward_gain"]["mean"])
        for c in (c for c in cells if c["data"] == data):
            ref = dpo.get((data, c["beta"])) if c["beta"] is not None else best_dpo
            beta = "—" if c["beta"] is None else f"{c['beta']:g}"
            n = len(c["seeds"])
            lines.append(
                f"| {c['variant']} | {beta} | {fmt(c['reward_gain'], sign=True)} | "
                f"{fmt(c['win_rate'], 2)} | {c['base_fidelity']['mean']:.2f} → "
                f"{fmt(c['tuned_fidelity'], 2)} | {fmt(c['loss_std'], 3)} | "
                f"{c['grad_norm_mean']['mean']:.3g} ± {c['grad_norm_std']['mean']:.3g} | "
                f"{round(c['collapse_rate'] * n)}/{n} | {versus(c, ref)} |")
        lines.append("")
    return "\n".join(lines)


def plot_curves(rows: list[dict], out: Path) -> list[Path]:
    """Reward gain against steps per data kind: a panel per beta, mean over seeds, min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    for data in sorted({r["data"] for r in rows}):
        runs = [r for r in rows if r["data"] == data and r["curve"]]
        betas = sorted({r["beta"] for r in runs if r["beta"] is not None}) or [None]
        fig, axes = plt.subplots(1, len(betas), figsize=(4.5 * len(betas), 3.6), squeeze=False,
                                 sharey=True)
        for ax, beta in zip(axes[0], betas, strict=True):
            for i, variant in enumerate(VARIANTS):
                group = [r for r in runs if r["variant"] == variant
                         and (r["beta"] == beta or r["beta"] is None)]
                if not group:
                    continue
                steps = [0] + sorted(int(k) for k in group[0]["curve"])
                gains = np.array([[0.0] + [r["curve"][str(k)]["reward_gain"] for k in steps[1:]]
                                  for r in group])  # [seeds, points]
                # dashes and markers keep overlapping curves (dpo-cm and sipo often are) visible
                marker = "os^vDPX<>*h"[i % 11]
                line, = ax.plot(steps, gains.mean(0), marker=marker, ms=3, label=variant,
                                ls=("-", "--", ":", "-.")[i % 4], color=f"C{i}")
                ax.fill_between(steps, gains.min(0), gains.max(0), alpha=0.15,
                                color=line.get_color())
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(f"{data}, beta {beta:g}" if beta is not None else data)
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("reward gain vs base (colour)")
        legend = {}  # every variant once, though some appear in one panel only
        for ax in axes[0]:
            legend.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
        axes[0][-1].legend(legend.values(), legend.keys(), fontsize=7)
        fig.tight_layout()
        path = out / f"reward_curves_{data}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def parse_args(argv: list[str] | None = None):
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, beta 5000, short runs (< 5 min)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_objectives")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--betas", type=float, nargs="+", default=[300.0, 1000.0, 3000.0, 10000.0])
    p.add_argument("--ablation-beta", type=float, default=3000.0,
                   help="the beta of the *-nosft variants (sft_weight = 0)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                   default=[v for v in VARIANTS if v not in TRAINING_OVERRIDES])
    p.add_argument("--data", nargs="+", default=list(DATA_KINDS), choices=DATA_KINDS)
    for name in ("steps", "batch", "num_pairs", "eval_samples", "eval_points",
                 "eval_inference_steps"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--fidelity-drop", type=float, default=d.fidelity_drop)
    p.add_argument("--report-only", action="store_true",
                   help="aggregate the runs already written (e.g. of a benchmark cut short)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.betas, args.ablation_beta = args.seeds[:1], [5000.0], 5000.0
        args.variants = [v for v in args.variants if not v.endswith("-nosft")]
        args.steps, args.eval_samples, args.eval_points = 30, 32, 2
    # inputs (pairs, the off-policy checkpoint, base images) are shared by every mode
    args.cache = args.out / "cache"
    args.runs = args.out / ("quick" if args.quick else "full")
    return args


def main(argv: list[str] | None = None) -> dict:
    from sipo_plugin.utils.io import atomic_write_text

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    start = time.time()
    s = replace(Settings(), **{k: getattr(args, k) for k in (
        "steps", "batch", "learning_rate", "num_pairs", "eval_samples", "eval_points",
        "eval_inference_steps", "fidelity_drop")})
    args.cache.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        rows = [json.loads(p.read_text()) for p in sorted((args.runs / "runs").rglob("seed*.json"))]
    else:
        pair_models = {"on_policy": "toy"}
        if "off_policy" in args.data:
            pair_models["off_policy"] = str(ensure_early_model(args.cache, s))
        inputs = {data: ensure_pairs(args.cache, data, pair_models[data], s) for data in args.data}
        base_images = ensure_base_images(args.cache, s)
        rows = run_all(build_specs(args, s, inputs, base_images), args.workers)
    cells = aggregate(rows)
    summary = {"settings": asdict(s), "seeds": args.seeds, "betas": args.betas,
               "wall_s": round(time.time() - start, 1), "load_avg": os.getloadavg(),
               "runs": len(rows), "cells": cells}
    atomic_write_text(args.runs / "results.json", json.dumps(summary, indent=1))
    table = markdown_tables(cells)
    atomic_write_text(args.runs / "summary.md", table)
    plots = plot_curves(rows, args.runs)
    print(table)
    print(f"{len(rows)} runs, done in {summary['wall_s']} s (load average "
          f"{', '.join(f'{x:.1f}' for x in summary['load_avg'])}); {args.runs / 'results.json'}, "
          f"plots: {', '.join(str(p) for p in plots)}")
    return summary


if __name__ == "__main__":
    main()
