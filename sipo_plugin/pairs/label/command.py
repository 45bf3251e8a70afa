"""``sipo-pairs label --candidates DIR``: choose between two candidates in the browser.

Starts a local server (127.0.0.1 and a free port by default) and prints the page's address. Keys:
left / right arrow picks the winner, down arrow a tie, `s` skips, `u` undoes the last label. Every
label is appended to DIR/labels.jsonl and fsynced before the next pair is shown; stop the server
at any moment and start it again to continue the same schedule.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from sipo_plugin.pairs.candidates import CandidatesError, read_candidates
from sipo_plugin.pairs.label.session import LabelSession
from sipo_plugin.pairs.label.server import make_server
from sipo_plugin.pairs.label.store import LABELS_FILE, LabelLog, LabelsError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidates", required=True, metavar="DIR",
                        help="candidates folder (from `sipo-pairs sample`); labels go to "
                             f"DIR/{LABELS_FILE}")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; "
                             "0.0.0.0 exposes the page to your network)")
    parser.add_argument("--port", type=int, default=0,
                        help="port (default 0: a free one, printed at start)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the pair schedule (default: the one DIR/labels.jsonl was "
                             "started with, or 0)")


def check_media(folder: Path, candidates) -> None:
    """Every candidate's image, clip or frame folder exists; one line naming the first missing."""
    missing = [c for c in candidates if not (folder / c.path).exists()]
    if missing:
        raise CandidatesError(f"{folder / missing[0].path}: candidate {missing[0].id} has no "
                              f"file ({len(missing)} of {len(candidates)} missing); re-run "
                              f"`sipo-pairs sample --out {folder}` or remove their lines")


def run(args: argparse.Namespace) -> int:
    folder = Path(args.candidates)
    try:
        candidates = read_candidates(folder)
        check_media(folder, candidates)
        log = LabelLog(folder, seed=args.seed, owner=f"`sipo-pairs label` (pid {os.getpid()})")
    except (CandidatesError, LabelsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        session = LabelSession(folder, candidates, log)
        try:
            server = make_server(session, args.host, args.port)
        except OSError as err:
            print(f"error: cannot listen on {args.host}:{args.port} ({err.strerror or err}); "
                  f"pick another --port", file=sys.stderr)
            return 2
        host, port = server.server_address[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
        if args.host not in LOCAL_HOSTS:
            print(f"warning: --host {args.host} serves this page to every machine that can reach "
                  f"port {port}: anyone there can see the candidates and label them",
                  file=sys.stderr)
        if log.torn_bytes:
            print(f"note: cut an unfinished last line ({log.torn_bytes} bytes) from {log.path}: "
                  f"the label being written when the server stopped", file=sys.stderr)
        progress = session.state()["progress"]
        print(f"labelling {len(session.groups)} prompts ({len(candidates)} candidates) of "
              f"{folder}: {progress['total']['done']} / {progress['total']['planned']} pairs "
              f"labelled", flush=True)
        print(f"open {url}   (Ctrl+C stops; every label is already on disk)", flush=True)
        signal.signal(signal.SIGTERM, _stop)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        print(f"stopped; labels in {log.path}. Pairs: sipo-pairs make --candidates {folder} "
              f"--from-labels --out pairs.jsonl", flush=True)
        return 0
    finally:
        log.close()


def _stop(signum, frame) -> None:
    """SIGTERM stops the server like Ctrl+C (nothing to save: every label is on disk)."""
    raise KeyboardInterrupt
