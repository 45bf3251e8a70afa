"""A held-out share of the training prompts, for evaluating on prompts training never saw."""

from __future__ import annotations

import hashlib


def heldout_prompts(prompts, share: float, seed: int) -> list[str]:
    """round(share x distinct prompts) of them (at least one when share > 0), chosen by a hash of
    (seed, prompt): the same prompts whatever the file order."""
    distinct = sorted(set(prompts))
    if share <= 0 or not distinct:
        return []
    count = min(len(distinct) - 1, max(1, round(share * len(distinct))))
    ranked = sorted(distinct, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    return sorted(ranked[:count])


def split_holdout(records, share: float, seed: int) -> tuple[list, list[str]]:
    """(the pairs whose prompt is not held out, the held-out prompts)."""
    held = set(heldout_prompts([r.prompt for r in records], share, seed))
    return [r for r in records if r.prompt not in held], sorted(held)


def training_records(config, records) -> list:
    """The pairs a run trains on: without the held-out prompts when the evaluation holds some out."""
    e = config.evaluate
    if e.eval_prompts or e.eval_holdout <= 0:
        return records
    return split_holdout(records, e.eval_holdout, config.training.seed)[0]
