"""Checks of [sampling], [pairs] and [evaluate] that need no model (called by the config)."""

from __future__ import annotations

from pathlib import Path

from ..pairs.prompts import prompt_set

STRATEGIES = ("best_worst", "all")


def _check_prompt_source(key: str, value: str) -> None:
    if value and prompt_set(value) is None and not Path(value).is_file():
        raise ValueError(f"{key} = '{value}': prompt file not found (a .txt / .jsonl, or 'toy')")


def check_pairs_and_evaluation(config) -> None:
    """ValueError (one line, naming the key and the fix) for a setting that cannot work."""
    from ..pairs.sampler_settings import check_sampling_section
    p, e = config.pairs, config.evaluate
    check_sampling_section(config.sampling, config.model.family)
    if p.pairs_prompts:
        _check_prompt_source("pairs_prompts", p.pairs_prompts)
        if p.candidates < 2:
            raise ValueError(f"'candidates' must be >= 2 to make pairs, got {p.candidates}")
        if not p.rewards:
            raise ValueError("pairs_prompts needs 'rewards' to score the candidates, e.g. "
                             "rewards = [\"pickscore=/models/PickScore_v1\"]")
        if p.pair_strategy not in STRATEGIES:
            raise ValueError(f"'pair_strategy' must be one of {', '.join(STRATEGIES)}, got "
                             f"'{p.pair_strategy}'")
        if not config.data.train_data.endswith(".jsonl"):
            raise ValueError("with pairs_prompts, train_data is the pair manifest written: give a "
                             ".jsonl path")
    if p.num_prompts < 0 or p.min_margin < 0:
        raise ValueError("'num_prompts' and 'min_margin' must be >= 0")
    evaluates = e.eval_after_training or e.evaluate_every_n_steps
    _check_prompt_source("eval_prompts", e.eval_prompts)
    if not 0.0 <= e.eval_holdout < 1.0:
        raise ValueError(f"'eval_holdout' must be in [0, 1), got {e.eval_holdout}")
    if min(e.eval_samples, e.eval_curve_samples) < 1 or e.evaluate_every_n_steps < 0:
        raise ValueError("'eval_samples' and 'eval_curve_samples' must be >= 1, "
                         "'evaluate_every_n_steps' >= 0")
    if evaluates and not reward_specs(config):
        raise ValueError("evaluation needs rewards: set eval_rewards (or [pairs] rewards, or "
                         "[online] online_rewards)")


def reward_specs(config) -> list[str]:
    """The rewards evaluation scores with: eval_rewards, else [pairs] rewards, else [online]
    online_rewards (the ones the pairs were made with)."""
    return list(config.evaluate.eval_rewards or config.pairs.rewards or config.online.online_rewards)
