"""Shared by the labelling tests: tiny PNG candidates, an in-process server, a JSON client."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

from sipo_plugin.pairs.candidates import Candidate, append_candidate, candidate_id
from sipo_plugin.pairs.label.server import make_server
from sipo_plugin.pairs.label.session import LabelSession
from sipo_plugin.pairs.label.store import LabelLog

ROOT = Path(__file__).resolve().parents[1]


def colour(prompt_index: int, candidate_index: int) -> tuple[int, int, int]:
    """A distinct colour per candidate; its red channel ranks candidates of a prompt."""
    return (40 + 25 * candidate_index, (37 * prompt_index) % 200, 120)


def write_candidates(folder: Path, sizes: list[int], size: int = 8) -> list[Candidate]:
    """`sizes[p]` candidates for prompt p, each a `size`-pixel PNG of `colour(p, c)`."""
    records = []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for p, k in enumerate(sizes):
        for c in range(k):
            cid = candidate_id(p, c)
            Image.new("RGB", (size, size), colour(p, c)).save(folder / "images" / f"{cid}.png")
            record = Candidate(id=cid, prompt=f"a red disc, take {p}", prompt_index=p,
                               candidate_index=c, seed=1000 * p + c, path=f"images/{cid}.png",
                               latents=f"latents/{cid}.safetensors")
            append_candidate(folder, record)
            records.append(record)
    return records


@contextlib.contextmanager
def running_server(folder: Path, seed: int | None = None):
    """An in-process server on a free port; yields (base url, session)."""
    from sipo_plugin.pairs.candidates import read_candidates

    log = LabelLog(folder, seed=seed, owner="test")
    session = LabelSession(folder, read_candidates(folder), log)
    server = make_server(session)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", session
    finally:
        server.shutdown()
        server.server_close()
        log.close()


def request(url: str, body: object = None, content_type: str = "application/json",
            raw: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body bytes); POST when `body` or `raw` is given."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}),
                                 method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def api(url: str, body: object = None, **kw) -> tuple[int, dict]:
    """(status, JSON payload) of an API call."""
    status, _, data = request(url, body, **kw)
    return status, json.loads(data)


def label_current(base: str, state: dict, outcome: str) -> tuple[int, dict]:
    """Post `outcome` for the pair `state` shows."""
    pair = state["pair"]
    return api(f"{base}/api/label", {"left": pair["left"]["id"], "right": pair["right"]["id"],
                                     "outcome": outcome})


def prefer_by_colour(records: list[Candidate], pair: dict) -> str:
    """The outcome a consistent labeller gives: the higher candidate_index (redder) wins."""
    index = {r.id: r.candidate_index for r in records}
    return "left" if index[pair["left"]["id"]] > index[pair["right"]["id"]] else "right"


def start_cli(folder: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`sipo-pairs label --candidates folder` in a subprocess; (process, page address)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sipo_plugin.pairs", "label", "--candidates", str(folder),
         *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in process.stdout:
        if match := re.search(r"open (http://\S+)", line):
            return process, match.group(1).rstrip("/")
    raise AssertionError(process.stderr.read())
