#!/usr/bin/env python
"""Preference training for diffusion models from a TOML preset.

    python train_sipo.py --preset presets/demo.toml [--key value ...]
    python train_sipo.py --list-objectives   (--list-rewards: the reward models)
    python train_sipo.py --preset P --check      # validate the preset and overrides, then stop
    python train_sipo.py --preset P --analyze    # importance weights, mask, gradient per timestep

Any preset key can be overridden: --learning_rate 5e-5, --training.max_train_steps 200,
--objective dpo-cm, --beta 2500 (an objective hyper-parameter).
"""

from __future__ import annotations

import argparse
import os
import sys

# transformers warns on import that torchvision is absent, which this package never needs
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Preset keys and defaults: README.md, 'Preset reference'.")
    parser.add_argument("--preset", help="TOML preset (see presets/)")
    parser.add_argument("--list-objectives", action="store_true",
                        help="print every registered objective with a one-line description")
    parser.add_argument("--list-rewards", action="store_true",
                        help="print every registered reward (for sipo-pairs score and evaluation)")
    parser.add_argument("--check", action="store_true",
                        help="validate the preset and overrides, print the resolved config, stop")
    parser.add_argument("--analyze", action="store_true",
                        help="instead of training: per timestep bucket, the importance weights, "
                        "the masked fraction and each objective's per-pair gradient norm "
                        "(<output_dir>/analysis/); with --resume, of a checkpoint's LoRA")
    parser.add_argument("--analysis-pairs", type=int, default=64, help="pairs analysed (--analyze)")
    parser.add_argument("--analysis-buckets", type=int, default=10,
                        help="timestep buckets over the schedule (--analyze)")
    parser.add_argument("--analysis-grad-pairs", type=int, default=16,
                        help="of those, pairs whose per-pair gradient norm is measured (--analyze)")
    return parser


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
    try:
        config = load_config(args.preset, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        import json
        print(json.dumps(config.to_dict(), indent=2, default=str))
        return 0
    from sipo_plugin.training.run import run
    from sipo_plugin.data import PairDataError
    from sipo_plugin.training.loop import NonFiniteLossError
    try:
        if args.analyze:
            from sipo_plugin.analysis import run_analysis
            run_analysis(config, n_pairs=args.analysis_pairs, n_buckets=args.analysis_buckets,
                         grad_pairs=args.analysis_grad_pairs)
            return 0
        run(config)
    except (PairDataError, NonFiniteLossError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished files are intact; nothing partial was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
