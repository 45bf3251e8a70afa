"""``train_sipo.py --preset P --analyze``: the per-timestep analysis of a run's model and pairs.

Writes ``<output_dir>/analysis/analysis.json`` and three PNGs (``plots.PLOTS``), prints the
calibrated ``kappa`` and what it masks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..objectives import get_objective
from ..utils.io import atomic_write_text
from .collect import (WEIGHT_DEFAULTS, analysis_records, collect, compared_objectives,
                      load_for_analysis, objective_fields, summarize, weight_settings)
from .plots import write_plots


def analysis_kappa(config, adapter, reference, settings: dict, checkpoint) -> tuple[float, str]:
    """The run's kappa: the checkpoint's, the preset's number, or calibrated like the trainer."""
    if checkpoint is not None and "kappa" in checkpoint["objective_hyperparameters"]:
        return float(checkpoint["objective_hyperparameters"]["kappa"]), "from the checkpoint"
    if settings["kappa"] != "auto":
        return float(settings["kappa"]), "from the preset"
    from ..data import read_pairs
    from ..training.calibration import run_calibration_sample

    name = config.objective.name
    source = name if "mask_threshold" in objective_fields(name) else WEIGHT_DEFAULTS
    accepted = objective_fields(source)
    hp = {k: v for k, v in config.objective.hyperparameters.items() if k in accepted}
    records = read_pairs(config.data.train_data, caption_extension=config.data.caption_extension)
    sample = run_calibration_sample(config, adapter, records, reference)
    objective = get_objective(source, **hp).calibrate(sample, adapter.noise_scheduler)
    return objective.config.kappa, "calibrated (kappa = 'auto', as the trainer does)"


def describe_mask(summary: dict) -> str:
    """One line per weight model: overall masked share and the buckets it falls in."""
    lines = []
    tau = summary["settings"]["mask_threshold"]
    for model in ("step", "reference"):
        shares = summary["masked_fraction"][model]
        where = ", ".join(f"t {lo}-{hi}: {s:.0%}" for (lo, hi), s in zip(summary["buckets"], shares,
                                                                            strict=True) if s > 0)
        lines.append(f"  weight_model '{model}': masks "
                     f"{summary['masked_fraction'][model + '_overall']:.1%} of the analysed pairs "
                     f"at w < {tau}" + (f" ({where})" if where else ""))
    return "\n".join(lines)


def run_analysis(config, *, n_pairs: int = 64, n_buckets: int = 10, grad_pairs: int = 16) -> dict:
    """Analyse ``n_pairs`` pairs of the run's data at one stratified timestep per bucket; the
    per-pair gradient norms on the first ``grad_pairs`` of them (one backward pass per sample)."""
    start = time.time()
    if min(n_pairs, n_buckets, grad_pairs) < 1:
        raise ValueError(f"--analysis-pairs, --analysis-buckets and --analysis-grad-pairs must be "
                         f">= 1, got {n_pairs}, {n_buckets} and {grad_pairs}")
    out_dir = Path(config.training.output_dir) / "analysis"
    records = analysis_records(config, n_pairs)
    generator = torch.Generator(device="cpu").manual_seed(config.training.seed)
    adapter, params, reference, checkpoint = load_for_analysis(config)
    settings = weight_settings(config)
    settings["kappa"], kappa_source = analysis_kappa(config, adapter, reference, settings,
                                                     checkpoint)
    objectives = compared_objectives(config, settings["kappa"])
    tqdm.write(f"analysing {len(records)} pairs x {n_buckets} timestep buckets "
               f"({config.model.family}, {sum(p.numel() for p in params):,} trainable parameters)")
    parts = collect(config, adapter, params, reference, records, n_buckets=n_buckets,
                    grad_pairs=grad_pairs, generator=generator)
    summary = summarize(parts, objectives, adapter.noise_scheduler, settings, n_buckets)
    summary.update(
        settings={**settings, "kappa_source": kappa_source},
        model={"family": config.model.family, "path": config.model.pretrained_model_name_or_path,
               "lora_from": str(config.training.resume) or "fresh (policy = reference)"},
        objectives={name: o.hyperparameters() for name, o in objectives.items()},
        n_pairs=len(records), n_buckets=n_buckets, seconds=round(time.time() - start, 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "analysis.json", json.dumps(summary, indent=1, default=str))
    plots = write_plots(summary, out_dir)
    tqdm.write(f"kappa = {settings['kappa']:.6g} ({kappa_source}; target "
               f"{settings['target_mask_fraction']:.0%} masked at tau = "
               f"{settings['mask_threshold']})")
    tqdm.write(describe_mask(summary))
    tqdm.write(f"analysis written to {out_dir / 'analysis.json'} and "
               f"{', '.join(p.name for p in plots)} in {summary['seconds']} s")
    return summary
