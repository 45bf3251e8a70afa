"""The calibrated kappa of a preset over several calibration seeds, and over batch sizes.

    python benchmarks/kappa_spread.py [--preset presets/demo.toml] [--seeds 0 1 2 3 4]

kappa = "auto" is calibrated on `calibration_pairs` pairs (the first of the data's order for the
seed) with per-pair VAE, noise and timestep draws: the seed picks the pairs and the draws, the
batch size changes nothing. A preset with [pairs] makes its pairs first.
Prints one line per seed, then the spread, then the same seed at batch sizes 1, 2 and 8.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from sipo_plugin.data import read_pairs
from sipo_plugin.models import get_model_adapter
from sipo_plugin.training.config import load_config
from sipo_plugin.training.loop import objective_for_run

ROOT = Path(__file__).resolve().parents[1]


class _Quiet:
    def info(self, text):
        pass

    def event(self, name, **values):
        pass


def calibrated_kappa(config, adapter, records) -> float:
    return objective_for_run(config, adapter, records, None, _Quiet()).config.kappa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=str(ROOT / "presets" / "demo.toml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("overrides", nargs="*", help="preset overrides, e.g. --calibration_pairs 64")
    args, extra = parser.parse_known_args()
    overrides = [*args.overrides, *extra]
    config = load_config(args.preset, overrides)
    if config.pairs.pairs_prompts:  # the preset makes its pairs first (sample -> score -> make)
        from sipo_plugin.pairs.onpolicy import make_training_pairs
        make_training_pairs(config)
    records = read_pairs(config.data.train_data, caption_extension=config.data.caption_extension)
    adapter = get_model_adapter(config.model.family).load(config.model, device=torch.device("cpu"))
    adapter.add_trainable(config.network)
    start = time.time()
    kappas = []
    for seed in args.seeds:
        kappa = calibrated_kappa(load_config(args.preset, [*overrides, "--seed", str(seed)]),
                                 adapter, records)
        kappas.append(kappa)
        print(f"seed {seed}: kappa = {kappa:.4g}")
    mean, sd = statistics.mean(kappas), statistics.stdev(kappas) if len(kappas) > 1 else 0.0
    print(f"{len(kappas)} seeds, {min(config.training.calibration_pairs, len(records))} pairs each: "
          f"mean {mean:.4g}, sd {sd:.3g} ({sd / mean:.1%}), min {min(kappas):.4g}, "
          f"max {max(kappas):.4g} ({time.time() - start:.0f} s)")
    seed = args.seeds[0]
    by_batch = {b: calibrated_kappa(load_config(args.preset, [*overrides, "--seed", str(seed),
                                                              "--train_batch_size", str(b)]),
                                    adapter, records) for b in (1, 2, 8)}
    print(f"seed {seed}, train_batch_size 1 / 2 / 8: "
          + " / ".join(f"{k:.6g}" for k in by_batch.values()))


if __name__ == "__main__":
    main()
