"""The trainer's two hooks into the toy world: make the pair data, evaluate the result."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from ..utils.io import atomic_write_text
from .config import Config
from .loop import TrainResult


TOY_GUIDANCE = 3.0  # the toy world's guidance unless [sampling] guidance_scale sets one


def toy_guidance(config: Config) -> float:
    g = config.sampling.guidance_scale
    return g if g >= 0 else TOY_GUIDANCE


def _pair_settings(config: Config) -> dict:
    toy = config.toy
    return {"pair_model": toy.pair_model, "reward": toy.reward, "num_pairs": toy.num_pairs,
            "pair_seed": toy.pair_seed, "num_inference_steps": toy.num_inference_steps,
            "guidance_scale": toy_guidance(config)}


def ensure_toy_pairs(config: Config) -> Path:
    """Sample and label pairs into ``train_data`` (a .jsonl path), unless the same ones exist."""
    from ..models.sd15 import resolve_model_path
    from ..toy.pairs import generate_pairs
    from ..toy.pipeline import load_toy_pipeline
    from ..toy.rewards import get_reward

    manifest = Path(config.data.train_data)
    settings_file = manifest.with_name(manifest.stem + ".settings.json")
    settings = _pair_settings(config)
    if manifest.is_file() and settings_file.is_file():
        if json.loads(settings_file.read_text()) == settings:
            tqdm.write(f"reusing {manifest} (same pair settings)")
            return manifest
    toy = config.toy
    tqdm.write(f"generating {toy.num_pairs} pairs from {toy.pair_model} labelled by "
               f"'{toy.reward}' into {manifest.parent}")
    pipe = load_toy_pipeline(resolve_model_path(toy.pair_model))
    written = generate_pairs(pipe, manifest.parent, reward=get_reward(toy.reward),
                             n_pairs=toy.num_pairs, seed=toy.pair_seed,
                             num_inference_steps=toy.num_inference_steps,
                             guidance_scale=toy_guidance(config))
    if Path(written).resolve() != manifest.resolve():
        os.replace(written, manifest)
    atomic_write_text(settings_file, json.dumps(settings, indent=2))
    return manifest


def evaluate_run(config: Config, result: TrainResult) -> dict:
    """Base (adapter off) vs tuned (adapter on) on a fixed prompt x seed set: eval.json + grid PNG."""
    from ..toy.evaluate import eval_set, evaluate, save_grid
    from ..toy.pipeline import sample_images
    from ..toy.rewards import get_reward

    toy = config.toy
    output_dir = Path(config.training.output_dir)
    adapter = result.adapter
    pipe = adapter.sampling_pipeline()
    prompts, seeds = eval_set(toy.eval_samples)
    kwargs = {"num_inference_steps": toy.num_inference_steps, "guidance_scale": toy_guidance(config),
              **adapter.sampling_kwargs()}
    if config.network.finetune == "full":  # no adapter to switch off: sample a fresh base
        base_pipe = type(adapter).load(config.model, device=adapter.device).sampling_pipeline()
        base = sample_images(base_pipe, prompts, seeds, **kwargs)
    else:
        with adapter.reference():
            base = sample_images(pipe, prompts, seeds, **kwargs)
    tuned = sample_images(pipe, prompts, seeds, **kwargs)
    stats = evaluate(base, tuned, prompts, get_reward(toy.reward))
    stats.update(reward=toy.reward, objective=result.objective.name)
    save_grid(base, tuned, output_dir / "samples_before_after.png")
    atomic_write_text(output_dir / "eval.json", json.dumps(stats, indent=2))
    gain, se = stats["reward_gain"], stats["reward_se"]
    tqdm.write(f"reward '{toy.reward}': base {stats['base_reward']:.4f} -> tuned "
               f"{stats['tuned_reward']:.4f} (gain {gain:+.4f} +- {se:.4f} SE, "
               f"{gain / se if se > 0 else float('inf'):.1f} SE), win rate {stats['win_rate']:.2f}, "
               f"fidelity {stats['base_fidelity']:.2f} -> {stats['tuned_fidelity']:.2f}, "
               f"n = {stats['n_samples']}")
    return stats
