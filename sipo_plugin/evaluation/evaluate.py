"""Base vs tuned on the same (prompt, seed) samples, scored by every chosen reward.

The samples come from `sipo_plugin.pairs.sampler.generate` (the same code as the candidates) with
the run's [sampling] settings; the base is the tuned model with its LoRA switched off (or, for a
full fine-tune, a freshly loaded base). Per reward, `paired_stats` of the paired differences.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.families import named_model
from ..pairs.prompts import PromptEntry, cycle_prompts, read_prompts
from ..pairs.sampler import Sample, candidate_seed, configure_pipeline, generate
from ..utils.io import atomic_write_text
from .checks import reward_specs
from .grid import save_labelled_grid

GRID_FILE = "samples_before_after.png"
EVAL_FILE = "eval.json"


def paired_stats(base: torch.Tensor, tuned: torch.Tensor) -> dict:
    """Paired comparison of rewards [N] on the same (prompt, seed): d = tuned - base;
    reward_gain = mean(d), reward_se = std(d, ddof=1) / sqrt(N), win_rate = mean(1[d > 0] +
    0.5 * 1[d == 0]); plus the two means and N."""
    b, t = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if b.shape != t.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError(f"need two equal non-empty reward vectors, got {b.shape} and {t.shape}")
    d = t - b
    n = len(d)
    return {"base_reward": float(b.mean()), "tuned_reward": float(t.mean()),
            "reward_gain": float(d.mean()),
            "reward_se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "win_rate": float(np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0)).mean()),
            "n_samples": n}


def build_rewards(specs: list[str], device) -> dict:
    """reward name -> Reward (`sipo_plugin.rewards.build_reward`), each built once."""
    from ..rewards import build_reward
    rewards = [build_reward(spec, device=device) for spec in specs]
    return {r.name: r for r in rewards}


def score(reward, samples: list[Sample], prompts: list[str]) -> torch.Tensor:
    """[N] rewards; clips (more than one frame) average the image reward over their frames."""
    if any(len(s.frames) > 1 for s in samples):
        return reward.score_clips([s.frames for s in samples], prompts, every_k=1)
    return reward.score([s.frames[0] for s in samples], prompts)


def evaluation_prompts(config) -> list[PromptEntry]:
    """eval_prompts, or the training prompts (only the held-out ones with eval_holdout > 0)."""
    e = config.evaluate
    if e.eval_prompts or config.online.enabled:
        return read_prompts(e.eval_prompts or config.online.online_prompts)
    from ..data import read_pairs
    from .holdout import split_holdout
    records = read_pairs(config.data.train_data, caption_extension=config.data.caption_extension)
    held = split_holdout(records, e.eval_holdout, config.training.seed)[1]
    return [PromptEntry(p) for p in (held or sorted({r.prompt for r in records}))]


def evaluation_set(config, count: int) -> tuple[list[PromptEntry], list[int]]:
    """``count`` prompts (cycled) and one seed each, fixed by eval_seed: base and tuned see the
    same initial noise."""
    entries = cycle_prompts(evaluation_prompts(config), count)
    return entries, [candidate_seed(config.evaluate.eval_seed, i, 0) for i in range(len(entries))]


def sample_set(adapter, settings, entries: list[PromptEntry], seeds: list[int], batch_size: int,
               desc: str = "") -> list[Sample]:
    """One sample per (entry, seed), in batches, with the adapter as it is now."""
    pipe = configure_pipeline(adapter, settings)
    out: list[Sample] = []
    for i in tqdm(range(0, len(entries), batch_size), desc=desc, disable=not desc, leave=False):
        chunk = entries[i:i + batch_size]
        out += generate(pipe, adapter, settings, [e.prompt for e in chunk], seeds[i:i + batch_size],
                        [e.negative_prompt for e in chunk])
    return out


def sampler_settings(config):
    from ..pairs.sample import settings_from
    return settings_from(config.model.family, config.sampling)


def evaluate_run(config, adapter, *, base_adapter=None, objective: str | None = None) -> dict:
    """Sample base and tuned, score every reward, write eval.json and the grid; returns the stats
    (the first reward's at the top level, every reward's under "rewards")."""
    output_dir = Path(config.training.output_dir)
    rewards = build_rewards(reward_specs(config), adapter.device)
    entries, seeds = evaluation_set(config, config.evaluate.eval_samples)
    settings, batch = sampler_settings(config), config.sampling.sample_batch_size
    if base_adapter is not None:  # a full fine-tune has no adapter to switch off
        base = sample_set(base_adapter, settings, entries, seeds, batch, desc="eval base")
    else:
        with adapter.reference():
            base = sample_set(adapter, settings, entries, seeds, batch, desc="eval base")
    tuned = sample_set(adapter, settings, entries, seeds, batch, desc="eval tuned")
    prompts = [e.prompt for e in entries]
    per_reward = {name: paired_stats(score(r, base, prompts), score(r, tuned, prompts))
                  for name, r in rewards.items()}
    first = next(iter(per_reward))
    stats = {**per_reward[first], "reward": first, "rewards": per_reward,
             "reward_specs": {name: r.spec for name, r in rewards.items()},
             "settings": settings.to_dict(), "eval_seed": config.evaluate.eval_seed}
    if objective:
        stats["objective"] = objective
    named = named_model(config.model.pretrained_model_name_or_path)
    if named is not None and named.evaluation_stats is not None:  # e.g. the toy world's fidelity
        stats.update(named.evaluation_stats(base, tuned, prompts))
    save_labelled_grid(base, tuned, prompts, output_dir / GRID_FILE)
    atomic_write_text(output_dir / EVAL_FILE, json.dumps(stats, indent=2))
    for name, s in per_reward.items():
        z = s["reward_gain"] / s["reward_se"] if s["reward_se"] > 0 else float("inf")
        tqdm.write(f"reward '{name}': base {s['base_reward']:.4f} -> tuned {s['tuned_reward']:.4f} "
                   f"(gain {s['reward_gain']:+.4f} +- {s['reward_se']:.4f} SE, {z:.1f} SE), "
                   f"win rate {s['win_rate']:.2f}, n = {s['n_samples']}")
    if "base_fidelity" in stats:
        tqdm.write(f"fidelity {stats['base_fidelity']:.2f} -> {stats['tuned_fidelity']:.2f}")
    return stats


class RewardCurve:
    """``evaluate_every_n_steps``: the current model's mean reward on the first
    eval_curve_samples evaluation samples (fixed seeds), logged as eval/<reward>."""

    def __init__(self, config, adapter):
        e = config.evaluate
        self.entries, self.seeds = evaluation_set(config, min(e.eval_curve_samples, e.eval_samples))
        self.rewards = build_rewards(reward_specs(config), adapter.device)
        self.settings, self.batch = sampler_settings(config), config.sampling.sample_batch_size

    def log(self, adapter, log, step: int) -> dict:
        samples = sample_set(adapter, self.settings, self.entries, self.seeds, self.batch)
        prompts = [e.prompt for e in self.entries]
        values = {f"eval/{name}": float(score(r, samples, prompts).mean())
                  for name, r in self.rewards.items()}
        log.event("eval", step=step, **values)
        if log.trackers:
            log.accelerator.log(values, step=step)
        return values
