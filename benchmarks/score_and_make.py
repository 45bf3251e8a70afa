"""Cost of `sipo-pairs score` against batch size, and of `sipo-pairs make` on many candidates (CPU).

    python benchmarks/score_and_make.py [--model tiny|mid|both] [--candidates 32]
        [--batch_sizes 1,4,16] [--make_candidates 10000] [--threads 1]

Scoring runs `score_candidates` end to end (PNG decode, content hash, reward, fsynced append) on
a folder of 256 x 256 PNG candidates with ``pickscore`` on a random CLIP saved in PickScore's
layout, once per batch size (a fresh scores file each time):

- tiny: the tests' CLIP (tests/tiny_rewards.py: width 32, 32 x 32 input);
- mid: a ViT-B/32-sized vision tower (12 layers x 768, 224 x 224 input) and a 4-layer x 512
  text tower (about 100 M parameters).

`make` runs `make_manifest` (best_worst, then all) on ``--make_candidates`` 16 x 16 PNG
candidates, 4 per prompt, with a synthetic scores file of two rewards; read (candidates + scores
+ every image re-hashed) and pairing are timed apart. Times are wall and this process's CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


class Timer:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def write_candidates(folder: Path, n: int, size: int, per_prompt: int = 4) -> None:
    from sipo_plugin.pairs.candidates import CANDIDATES_FILE, Candidate, candidate_id
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        p, c = divmod(i, per_prompt)
        cid = candidate_id(p, c)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"images/{cid}.png")
        lines.append(Candidate(id=cid, prompt=f"a photo of a cat {p}", prompt_index=p,
                               candidate_index=c, seed=i, path=f"images/{cid}.png").to_json())
    (folder / CANDIDATES_FILE).write_text("\n".join(lines) + "\n")


def save_mid_pickscore(folder: Path) -> Path:
    import torch
    from tiny_models import tiny_clip_config, tiny_clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    text = tiny_clip_config(tiny_clip_tokenizer(), hidden_size=512, num_hidden_layers=4,
                            ).to_dict() | {"intermediate_size": 2048, "num_attention_heads": 8}
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, image_size=224, patch_size=32)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)
              ).save_pretrained(folder)
    tiny_clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224},
                       crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def bench_scoring(tmp: Path, model: str, n: int, batch_sizes: list[int]) -> list[dict]:
    from sipo_plugin.pairs.score import SCORES_FILE, score_candidates
    from sipo_plugin.rewards import build_reward
    from tiny_rewards import save_tiny_pickscore
    folder = tmp / f"cands-{model}"
    write_candidates(folder, n, 256)
    model_dir = (save_tiny_pickscore if model == "tiny" else save_mid_pickscore)(tmp / model)
    reward = build_reward(f"pickscore={model_dir}", device="cpu")
    params = sum(p.numel() for p in reward.fn.model.parameters())
    rows = []
    for batch_size in batch_sizes:
        (folder / SCORES_FILE).unlink(missing_ok=True)
        with Timer() as t:
            score_candidates(folder, [reward], batch_size=batch_size, progress=False)
        rows.append({"model": model, "params_M": round(params / 1e6, 2), "batch_size": batch_size,
                     "candidates": n, "cand_per_s": round(n / t.wall, 2),
                     "cpu_ms_per_cand": round(1000 * t.cpu / n, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write_scores(folder: Path, n: int) -> None:
    from sipo_plugin.pairs.candidates import read_candidates
    from sipo_plugin.pairs.score import SCORES_FILE, content_identity
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=n), rng.normal(size=n)
    lines = [json.dumps({"id": c.id, "image": content_identity(folder / c.path),
                         "scores": {"a": float(a[i]), "b": float(b[i])},
                         "rewards": {"a": "a", "b": "b"}})
             for i, c in enumerate(read_candidates(folder))]
    (folder / SCORES_FILE).write_text("\n".join(lines) + "\n")


def bench_make(tmp: Path, n: int) -> list[dict]:
    from sipo_plugin.pairs.candidates import read_candidates
    from sipo_plugin.pairs.make import combined_scores, make_manifest, make_pairs
    from sipo_plugin.pairs.score import load_scores
    folder = tmp / "make"
    write_candidates(folder, n, 16)
    write_scores(folder, n)
    with Timer() as read:
        candidates = read_candidates(folder)
        table = load_scores(folder, candidates)
    combined = combined_scores(candidates, table.scores, {}, folder / "scores.jsonl").tolist()
    identity = [table.identity[c.id] for c in candidates]
    rows = [{"step": "read candidates + scores (re-hash every image)", "candidates": n,
             "wall_s": round(read.wall, 3), "cpu_s": round(read.cpu, 3)}]
    for strategy in ("best_worst", "all"):
        with Timer() as pair:
            pairs, _ = make_pairs(candidates, combined, identity, strategy=strategy)
        with Timer() as whole:
            make_manifest(folder, tmp / f"pairs-{strategy}.jsonl", strategy=strategy)
        rows.append({"step": f"make_pairs {strategy}", "pairs": len(pairs),
                     "wall_s": round(pair.wall, 3), "cpu_s": round(pair.cpu, 3)})
        rows.append({"step": f"make_manifest {strategy} (read + pair + write + histogram)",
                     "wall_s": round(whole.wall, 3), "cpu_s": round(whole.cpu, 3)})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "mid", "both"), default="both")
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--batch_sizes", default="1,4,16")
    parser.add_argument("--make_candidates", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="score_make_"))
    try:
        for model in (("tiny", "mid") if args.model == "both" else (args.model,)):
            bench_scoring(tmp, model, args.candidates,
                          [int(b) for b in args.batch_sizes.split(",")])
        if args.make_candidates:
            bench_make(tmp, args.make_candidates)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
