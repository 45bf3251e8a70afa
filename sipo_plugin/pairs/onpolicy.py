"""[pairs]: the pairs a run trains on, made from the model itself before training.

sample (`sample_candidates`) -> score (`score_candidates`) -> make (`make_manifest`): the same
functions as the `sipo-pairs` steps, so the preset path and the command-line path give the same
files. Every step is resumable: a second run re-samples and re-scores nothing.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from .prompts import cycle_prompts, read_prompts


def candidates_folder(config) -> Path:
    p = config.pairs
    return Path(p.candidates_dir or Path(config.training.output_dir) / "candidates")


def make_training_pairs(config) -> Path:
    """Sample, score and pair into ``config.data.train_data``; returns the manifest."""
    from ..rewards import build_reward
    from .make import make_manifest
    from .sample import load_sampling_adapter, model_identity, sample_candidates, settings_from
    from .score import score_candidates
    p, folder = config.pairs, candidates_folder(config)
    entries = cycle_prompts(read_prompts(p.pairs_prompts), p.num_prompts)
    tqdm.write(f"pairs: {len(entries)} prompts x {p.candidates} candidates from "
               f"{config.model.pretrained_model_name_or_path} into {folder}, scored by "
               f"{', '.join(p.rewards)}")
    adapter = load_sampling_adapter(config.model, cpu=config.training.cpu)
    sample_candidates(adapter, entries, folder, settings=settings_from(config.model.family,
                                                                       config.sampling),
                      candidates=p.candidates, seed=p.pairs_seed,
                      batch_size=config.sampling.sample_batch_size,
                      model=model_identity(config.model))
    device = adapter.device
    del adapter  # training loads its own copy
    score_candidates(folder, [build_reward(spec, device=device) for spec in p.rewards])
    counts = make_manifest(folder, config.data.train_data, strategy=p.pair_strategy,
                           min_margin=p.min_margin)
    tqdm.write(f"pairs: {counts.summary()} -> {config.data.train_data}")
    return Path(config.data.train_data)
