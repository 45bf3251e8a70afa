#!/usr/bin/env python
"""Preference training for diffusion models from a TOML preset.

    python train_sipo.py --preset presets/demo.toml [--key value ...]
    python train_sipo.py --list-objectives   (--list-rewards: the reward models)
    python train_sipo.py --preset P --check      # validate the preset, overrides, model folder
                                                 # and pair data (no model load), then stop
    python train_sipo.py --preset P --check --deep   # ... and decode every image
    python train_sipo.py --preset P --analyze    # importance weights, mask, gradient per timestep
    python train_sipo.py --config_file sd_scripts.toml [--dataset_config pairs.toml]  # sd-scripts'
    python train_sipo.py --preset P --evaluate   # base vs base + LoRA, scored by the rewards
    python train_sipo.py --preset P --estimate [--vram 8 12 24]   # memory per part, no weights read

Any preset key can be overridden: --learning_rate 5e-5, --learning_rate=5e-5, --training.max_train_steps
200, --objective dpo-cm, --beta 2500 (an objective hyper-parameter), --cache_latents (a bare flag is
true); sd-scripts' option names work too (--sdpa, --network_module networks.lora, --unet_lr).
"""

from __future__ import annotations

import argparse
import os
import sys

# transformers warns on import that torchvision is absent, which this package never needs
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def settings_help() -> str:
    """Every preset setting by section, as --help shows it (the same source as the README table)."""
    from sipo_plugin.training.config import describe_keys
    lines = ["Settings: every preset key, overridable as --key value (or --section.key value);",
             "objective hyper-parameters (--beta, --kappa, ...): --list-objectives, README",
             "'Objectives'. Defaults and details: README.md, 'Preset reference'."]
    section = None
    for name, key, default, text in describe_keys():
        if name != section:
            section = name
            lines.append(f"\n[{section}]")
        lines.append(f"  --{key} (default {default!r}): {text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=settings_help())
    parser.add_argument("--preset", help="TOML preset (see presets/)")
    parser.add_argument("--config_file",
                        help="sd-scripts training config (.toml; sections are cosmetic, its keys "
                        "are mapped onto the settings here, command-line options win); also "
                        "reads a file written by --output_config")
    parser.add_argument("--output_config", nargs="?", const=True, metavar="PATH",
                        help="write the resolved settings (this project's preset layout) to PATH "
                        "and stop; bare, as sd-scripts: to the --config_file path (not read)")
    parser.add_argument("--list-objectives", action="store_true",
                        help="print every registered objective with a one-line description")
    parser.add_argument("--list-rewards", action="store_true",
                        help="print every registered reward (for sipo-pairs score and evaluation)")
    parser.add_argument("--check", action="store_true",
                        help="validate the preset and overrides, the model folder against family "
                        "and the pair data (paths, captions); print every problem found, or the "
                        "resolved config; stop (no torch import: about a second)")
    parser.add_argument("--deep", action="store_true",
                        help="with --check: also decode every image of the pair data")
    parser.add_argument("--analyze", action="store_true",
                        help="instead of training: per timestep bucket, the importance weights, "
                        "the masked fraction and each objective's per-pair gradient norm "
                        "(<output_dir>/analysis/); with --resume, of a checkpoint's LoRA")
    parser.add_argument("--evaluate", action="store_true",
                        help="instead of training: sample the base model and the base with a LoRA "
                        "(eval_network_weights, else the run's export) with the same seeds, score "
                        "every reward ([evaluate]) into <output_dir>/eval.json and a grid PNG")
    parser.add_argument("--estimate", action="store_true",
                        help="instead of training: the memory the run needs (weights per module "
                        "and dtype, trained parameters, gradients, optimizer states, reference, "
                        "caches, activations by pairs and resolution) from the model's configs on "
                        "the meta device (no weights read; without the model: the family's "
                        "published architecture); exact but for the activations (calibrated)")
    parser.add_argument("--vram", type=float, nargs="+", default=[], metavar="GB",
                        help="with --estimate: say whether the run fits in these GPU sizes (GiB), "
                        "e.g. --vram 8 12 24")
    parser.add_argument("--analysis-pairs", type=int, default=64, help="pairs analysed (--analyze)")
    parser.add_argument("--analysis-buckets", type=int, default=10,
                        help="timestep buckets over the schedule (--analyze)")
    parser.add_argument("--analysis-grad-pairs", type=int, default=16,
                        help="of those, pairs whose per-pair gradient norm is measured (--analyze)")
    return parser


def write_output_config(args, overrides: list[str]) -> int:
    """--output_config [PATH]: the resolved settings as a preset, never over an existing file."""
    from pathlib import Path

    from sipo_plugin.training.config import ConfigError, load_config
    from sipo_plugin.training.config_layers import config_to_toml
    from sipo_plugin.utils.io import atomic_write_text
    if args.output_config is True:  # sd-scripts: the --config_file path is the output
        if not args.config_file:
            raise ConfigError("--output_config without a path needs --config_file (the file to write)")
        path, config = Path(args.config_file), load_config(args.preset, overrides)
    else:
        path = Path(args.output_config)
        config = load_config(args.preset, overrides, config_file=args.config_file)
    if path.exists():
        raise ConfigError(f"{path}: already exists; --output_config does not overwrite (give a new path)")
    atomic_write_text(path, config_to_toml(config.to_dict()))
    print(f"settings written to {path}")
    return 0


def print_errors(problems: list[str]) -> None:
    """``error: ...`` lines on stderr, each on its own line (live progress bars are closed first,
    so no line is glued to one)."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)


def check(config, *, deep: bool) -> int:
    """--check: the model folder and the pair data (without loading a model); every problem, or
    the resolved config."""
    import json
    from sipo_plugin.training.checks import startup_problems
    problems = startup_problems(config, deep=deep)
    if problems:
        print_errors(problems)
        return 2
    print(json.dumps(config.to_dict(), indent=2, default=str))
    return 0


def estimate(args, overrides: list[str]) -> int:
    """--estimate: the memory report; a preset whose model or data is not on this machine is
    estimated all the same (the model's published architecture), other problems stop it."""
    from sipo_plugin.estimate import EstimateError, config_for_estimate, estimate_report
    from sipo_plugin.training.config import ConfigError
    try:
        config, notes = config_for_estimate(args.preset, overrides, args.config_file)
        print(estimate_report(config, args.vram, notes))
    except (ConfigError, EstimateError) as err:
        print_errors(getattr(err, "problems", [str(err)]))
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    if args.list_objectives:
        from sipo_plugin.objectives import describe_objectives
        for name, description in describe_objectives().items():
            print(f"{name:16s} {description}")
        return 0
    if args.list_rewards:
        from sipo_plugin.pairs.score import print_rewards
        print_rewards()
        return 0
    from sipo_plugin.training.config import ConfigError, load_config
    if args.estimate:
        return estimate(args, overrides)
    try:
        if args.output_config:
            return write_output_config(args, overrides)
        config = load_config(args.preset, overrides, config_file=args.config_file)
    except ConfigError as err:
        further = getattr(err, "config", None) if args.check else None
        if further is not None:
            from sipo_plugin.training.checks import startup_problems
            err.problems.extend(startup_problems(further, deep=args.deep))
        print_errors(err.problems)
        return 2
    if args.check:
        return check(config, deep=args.deep)
    from sipo_plugin.training.memory import quiet_bitsandbytes
    from sipo_plugin.training.stopping import handle_sigterm_like_sigint
    quiet_bitsandbytes(config.training)  # before diffusers imports it
    handle_sigterm_like_sigint()
    from sipo_plugin.training.run import run
    from sipo_plugin.data import PairDataError
    from sipo_plugin.training.loop import NonFiniteLossError
    try:
        if args.analyze:
            from sipo_plugin.analysis import run_analysis
            run_analysis(config, n_pairs=args.analysis_pairs, n_buckets=args.analysis_buckets,
                         grad_pairs=args.analysis_grad_pairs)
            return 0
        if args.evaluate:
            from sipo_plugin.training.run import evaluate_only
            evaluate_only(config)
            return 0
        run(config)
    except (PairDataError, NonFiniteLossError, ValueError, OSError) as err:
        print_errors(getattr(err, "problems", [str(err)]))
        return 1
    except KeyboardInterrupt as err:
        print_errors([f"interrupted ({err or 'Ctrl-C'}): finished files are intact; nothing "
                      "partial was written"])
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
