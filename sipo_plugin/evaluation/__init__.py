"""Evaluation of any model: base vs tuned on fixed (prompt, seed) samples, scored by rewards.

`evaluate_run` writes ``<output_dir>/eval.json`` (per reward: base_reward, tuned_reward,
reward_gain, reward_se, win_rate, n_samples) and a labelled grid PNG; `RewardCurve` logs the
current LoRA's mean reward during training (``evaluate_every_n_steps``).
"""

from __future__ import annotations

from ..utils.lazy import lazy_getattr

# loaded on first use: `checks` (config validation, --check) must not import torch
_MODULE_OF = {"evaluate_run": "evaluate", "paired_stats": "evaluate", "split_holdout": "holdout",
              "training_records": "holdout"}
__all__ = sorted(_MODULE_OF)

__getattr__ = lazy_getattr(__name__, _MODULE_OF, globals())
