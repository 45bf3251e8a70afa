"""The labelling server's answer time with a large candidates folder, and the Swiss schedule's clicks.

    .venv/bin/python benchmarks/label_server.py [--candidates 10000] [--labels 300]

1. Writes --candidates tiny PNG candidates (K = 4 and K = 8 per prompt, two folders), starts the
   server in-process on a free port and times --labels POST /api/label round trips over HTTP
   (each one appends, fsyncs, re-plans the prompt and returns the next pair), plus GET /api/state.
2. Simulates a consistent labeller (a hidden utility decides every pair) on the Swiss schedule:
   clicks per prompt against every pair, and how often the best and the worst are found.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

from sipo_plugin.pairs.candidates import Candidate, candidate_id, read_candidates
from sipo_plugin.pairs.label.schedule import best_and_worst, pair_key, plan_prompt
from sipo_plugin.pairs.label.server import make_server
from sipo_plugin.pairs.label.session import LabelSession
from sipo_plugin.pairs.label.store import LabelLog


def write_folder(folder: Path, total: int, k: int) -> None:
    (folder / "images").mkdir(parents=True)
    lines = []
    for n in range(total):
        p, c = divmod(n, k)
        cid = candidate_id(p, c)
        Image.new("RGB", (8, 8), (n % 256, c * 30, 90)).save(folder / "images" / f"{cid}.png")
        lines.append(Candidate(id=cid, prompt=f"prompt {p}", prompt_index=p, candidate_index=c,
                               seed=n, path=f"images/{cid}.png").to_json())
    (folder / "candidates.jsonl").write_text("\n".join(lines) + "\n")


def _call(connection: http.client.HTTPConnection, path: str, body: dict | None = None) -> dict:
    """One request on a kept-alive connection, as a browser tab sends them."""
    if body is None:
        connection.request("GET", path)
    else:
        connection.request("POST", path, json.dumps(body),
                           {"Content-Type": "application/json"})
    return json.loads(connection.getresponse().read())


def time_labels(folder: Path, labels: int) -> dict:
    start = time.perf_counter()
    log = LabelLog(folder)
    session = LabelSession(folder, read_candidates(folder), log)
    startup = time.perf_counter() - start
    server = make_server(session)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tab = http.client.HTTPConnection("127.0.0.1", server.server_address[1])
    state, label_ms, state_ms = _call(tab, "/api/state"), [], []
    rng = random.Random(0)
    for _ in range(labels):
        pair = state["pair"]
        body = {"left": pair["left"]["id"], "right": pair["right"]["id"],
                "outcome": rng.choice(["left", "right"])}
        t = time.perf_counter()
        state = _call(tab, "/api/label", body)
        label_ms.append(1000 * (time.perf_counter() - t))
        t = time.perf_counter()
        _call(tab, "/api/state")
        state_ms.append(1000 * (time.perf_counter() - t))
    tab.close()
    server.shutdown()
    server.server_close()
    log.close()
    q = statistics.quantiles(label_ms, n=20)
    return {"startup_s": startup, "label_median_ms": statistics.median(label_ms),
            "label_p95_ms": q[-1], "label_max_ms": max(label_ms),
            "state_median_ms": statistics.median(state_ms), "planned": state["progress"]["total"]}


def simulate(k: int, trials: int) -> tuple[float, float, float]:
    """(mean clicks, share of best found, share of worst found) for a consistent labeller."""
    clicks = best = worst = 0
    rng = random.Random(k)
    ids = [f"c{i:02d}" for i in range(k)]
    for seed in range(trials):
        utility = {i: rng.random() for i in ids}
        decisions: dict = {}
        while pending := plan_prompt(ids, decisions, seed)[0]:
            a, b = pending[0]
            decisions[pair_key(a, b)] = a if utility[a] > utility[b] else b
        found = best_and_worst(ids, decisions, seed)
        clicks += len(decisions)
        best += found[0] == max(ids, key=utility.get)
        worst += found[1] == min(ids, key=utility.get)
    return clicks / trials, best / trials, worst / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=10_000)
    parser.add_argument("--labels", type=int, default=300)
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for k in (4, 8):
            folder = Path(tmp) / f"k{k}"
            write_folder(folder, args.candidates, k)
            r = time_labels(folder, args.labels)
            print(f"{args.candidates} candidates, K={k}: startup {r['startup_s']:.2f} s; "
                  f"POST /api/label median {r['label_median_ms']:.1f} ms, p95 "
                  f"{r['label_p95_ms']:.1f} ms, max {r['label_max_ms']:.1f} ms "
                  f"({args.labels} labels); GET /api/state median "
                  f"{r['state_median_ms']:.1f} ms; planned pairs {r['planned']['planned']}")
    print("K  clicks (Swiss)  every pair  best found  worst found   (consistent labeller)")
    for k in (5, 6, 8, 12, 16, 32):
        clicks, best, worst = simulate(k, args.trials)
        print(f"{k:<3}{clicks:>14.1f}{k * (k - 1) // 2:>12}{best:>12.0%}{worst:>13.0%}")


if __name__ == "__main__":
    main()
