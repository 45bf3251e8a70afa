"""``sipo-pairs``: one subcommand per step (see `sipo_plugin.pairs`).

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code); `SUBCOMMANDS` maps the name to the module and its help line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# name -> (module under sipo_plugin.pairs, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("sample", "sample K candidates per prompt from your model (images or clips + latents)"),
    "score": ("score", "score every candidate with reward models into DIR/scores.jsonl"),
    "label": ("label.command", "label pairs by eye in the browser (a local page, keyboard first)"),
    "make": ("make_command", "preference pairs (a JSONL manifest) from scored candidates"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only that subcommand's module is imported (the others may
    import torch, seconds on a cold start: `sipo-pairs label` starts without it)."""
    parser = argparse.ArgumentParser(prog="sipo-pairs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_line) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_line, description=help_line)
        if command in (None, name):
            importlib.import_module(f"sipo_plugin.pairs.{module}").add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in SUBCOMMANDS else None).parse_args(argv)
    module, _ = SUBCOMMANDS[args.command]
    return importlib.import_module(f"sipo_plugin.pairs.{module}").run(args)


if __name__ == "__main__":
    sys.exit(main())
