"""``sipo-pairs make``: the command line of `make` (reward scores -> pairs) and of
`label.export` (hand labels -> pairs, ``--from-labels``), above both so neither imports the other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.errors import PairDataError
from .candidates import CandidatesError
from .label.export import write_label_manifest
from .make import STRATEGIES, histogram_path, make_manifest, parse_weights
from .score import ScoresError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidates", required=True, metavar="DIR",
                        help="the candidates folder, scored (`sipo-pairs score`)")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the pair manifest to write (.jsonl); its margin histogram is "
                        "written beside it as <name>.margins.png")
    parser.add_argument("--strategy", choices=STRATEGIES, default="best_worst",
                        help="best_worst: one pair per prompt (default); all: every pair of "
                        "candidates of a prompt whose margin clears --min_margin")
    parser.add_argument("--min_margin", type=float, default=0.0,
                        help="drop pairs whose combined-score margin (in reward standard "
                        "deviations) is below this (default 0: only ties are dropped)")
    parser.add_argument("--reward_weight", action="append", default=[], metavar="NAME=W",
                        help="weight of a scored reward in the combined z-score (repeatable); "
                        "without it every scored reward counts with weight 1")
    # --from-labels: issue 14 (sipo_plugin.pairs.label.export)
    parser.add_argument("--from-labels", "--from_labels", dest="from_labels", action="store_true",
                        help="pairs from hand labels (DIR/labels.jsonl, `sipo-pairs label`); "
                        "with reward scores too, labels win and unlabelled prompts use the scores")


def run(args: argparse.Namespace) -> int:
    if args.from_labels:
        return _run_from_labels(args)
    try:
        counts = make_manifest(args.candidates, args.out, strategy=args.strategy,
                               min_margin=args.min_margin, weights=parse_weights(args.reward_weight))
    except (CandidatesError, ScoresError, PairDataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{counts.summary()}: {args.out} (margins: {histogram_path(Path(args.out))})")
    return 0


def _run_from_labels(args: argparse.Namespace) -> int:
    try:
        summary = write_label_manifest(args.candidates, args.out, strategy=args.strategy,
                                       min_margin=args.min_margin,
                                       weights=parse_weights(args.reward_weight))
    except (CandidatesError, ScoresError, PairDataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{summary}: {args.out}")
    return 0
