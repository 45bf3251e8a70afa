"""PNG plots of an analysis summary (matplotlib, no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

from ..utils.io import atomic_write_bytes

PLOTS = ("weights_by_timestep.png", "masked_fraction.png", "grad_norm_by_timestep.png")
LINE_STYLES = ("-", "--", ":", "-.")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _centres(summary: dict) -> list[float]:
    return [(lo + hi) / 2 for lo, hi in summary["buckets"]]


def _save(fig, path: Path) -> Path:
    """Write the figure as a PNG atomically and release it."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_weights(summary: dict, path: Path) -> Path:
    """Median raw weight per bucket with 25-75 % and 5-95 % bands, one panel per weight model."""
    plt = _pyplot()
    x = _centres(summary)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    for ax, (model, stats) in zip(axes, summary["importance_weights"].items(), strict=True):
        q = {k: [s[k] for s in stats] for k in ("q05", "q25", "q50", "q75", "q95")}
        ax.fill_between(x, q["q05"], q["q95"], alpha=0.15, color="C0", label="5-95 %")
        ax.fill_between(x, q["q25"], q["q75"], alpha=0.3, color="C0", label="25-75 %")
        ax.plot(x, q["q50"], marker="o", color="C0", label="median")
        ax.axhline(summary["settings"]["mask_threshold"], color="C3", ls="--", lw=1,
                   label=f"tau = {summary['settings']['mask_threshold']}")
        ax.set_title(f"weight_model = '{model}'")
        ax.set_xlabel("timestep")
        ax.set_ylabel("raw importance weight w")
        ax.legend(fontsize=7)
    fig.suptitle(f"kappa = {summary['settings']['kappa']:.4g}", fontsize=9)
    return _save(fig, path)


def plot_masked(summary: dict, path: Path) -> Path:
    """Masked share of pairs per bucket at tau, both weight models side by side."""
    plt = _pyplot()
    x = _centres(summary)
    width = (summary["buckets"][0][1] - summary["buckets"][0][0] + 1) * 0.4
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, model in enumerate(("step", "reference")):
        ax.bar([c + (i - 0.5) * width for c in x], summary["masked_fraction"][model], width=width,
               label=f"{model} (overall {summary['masked_fraction'][model + '_overall']:.1%})")
    ax.set_xlabel("timestep")
    ax.set_ylabel(f"masked fraction (w < {summary['settings']['mask_threshold']})")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_grad_norms(summary: dict, path: Path) -> Path:
    """Per-pair gradient norm per bucket: mean with a 5-95 % band (log scale), and its variance."""
    plt = _pyplot()
    x = _centres(summary)
    fig, (ax, ax_var) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (name, stats) in enumerate(summary["grad_norm"].items()):
        colour, style = f"C{i}", LINE_STYLES[i % len(LINE_STYLES)]  # equal curves stay visible
        ax.plot(x, [s["mean"] for s in stats], marker="os^vD"[i % 5], ms=3, ls=style,
                color=colour, label=name)
        ax.fill_between(x, [s["q05"] for s in stats], [s["q95"] for s in stats], alpha=0.12,
                        color=colour)
        ax_var.plot(x, [s["std"] ** 2 for s in stats], marker="os^vD"[i % 5], ms=3, ls=style,
                    color=colour, label=name)
    for a, label in ((ax, "per-pair gradient norm (mean, 5-95 %)"),
                     (ax_var, "variance of the norm")):
        a.set_yscale("symlog", linthresh=1e-6)
        a.set_xlabel("timestep")
        a.set_ylabel(label)
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_plots(summary: dict, folder: Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [plot_weights(summary, folder / PLOTS[0]), plot_masked(summary, folder / PLOTS[1]),
            plot_grad_norms(summary, folder / PLOTS[2])]
