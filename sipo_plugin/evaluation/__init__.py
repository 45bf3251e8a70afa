"""Evaluation of any model: base vs tuned on fixed (prompt, seed) samples, scored by rewards.

`evaluate_run` writes ``<output_dir>/eval.json`` (per reward: base_reward, tuned_reward,
reward_gain, reward_se, win_rate, n_samples) and a labelled grid PNG; `RewardCurve` logs the
current LoRA's mean reward during training (``evaluate_every_n_steps``).
"""

from .evaluate import evaluate_run, paired_stats  # noqa: F401
from .holdout import split_holdout, training_records  # noqa: F401
