"""The [online] preset section: pairs refreshed from the policy while it trains (training/online.py).

Torch-free: the config validates it and ``--check`` reads it without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ONLINE_STRATEGIES = ("best_worst", "all")  # sipo_plugin.pairs.make.STRATEGIES (that one imports torch)


def _help(text: str, default):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class OnlineConfig:
    """Online preference training: every refresh_every_n_steps steps, candidates are sampled from
    the current policy (LoRA on), scored, paired and added to a pool the batches are drawn from."""
    online_prompts: str = _help(
        "online training: prompts the policy samples candidates of while it trains (a .txt / "
        ".jsonl file, or 'toy'); '' = offline training on train_data", "")
    refresh_every_n_steps: int = _help(
        "online: sample, score and pair new candidates before every N-th step (and before step 1)",
        10)
    prompts_per_refresh: int = _help(
        "online: prompts sampled per refresh, taken from online_prompts in order and cycled", 16)
    candidates_per_prompt: int = _help("online: candidates sampled per prompt (>= 2)", 2)
    online_rewards: list = _help(
        "online: rewards that score the candidates (`sipo-pairs score --reward` specs; several "
        "combine as a sum of per-reward z-scores over each refresh's candidates)", [])
    online_pair_strategy: str = _help(
        "online: best_worst (one pair per prompt) or all (every pair over online_min_margin)",
        "best_worst")
    online_min_margin: float = _help(
        "online: smallest combined-score margin a pair needs (ties, margin 0, are always dropped)",
        0.0)
    pool_size: int = _help("online: the most recent pairs kept in the pool batches are drawn from",
                           256)
    offline_mix: float = _help(
        "online: share of optimizer steps whose batches come from train_data's offline pairs "
        "instead of the pool (0: pool only)", 0.0)

    @property
    def enabled(self) -> bool:
        return bool(self.online_prompts)


def online_problems(config) -> list[str]:
    """One line per [online] setting that cannot work (no model, no files read but the prompts')."""
    o, t, d = config.online, config.training, config.data
    if not o.enabled:
        if o != OnlineConfig():
            return ["[online] settings given without online_prompts: set online_prompts to a "
                    "prompt file (or 'toy') to train online, or remove the [online] keys"]
        return []
    problems = []
    if o.online_prompts != "toy" and not Path(o.online_prompts).is_file():
        problems.append(f"online_prompts = '{o.online_prompts}': prompt file not found (a .txt "
                        "with one prompt a line, a .jsonl, or 'toy')")
    ranges = {"refresh_every_n_steps": o.refresh_every_n_steps >= 1,
              "prompts_per_refresh": o.prompts_per_refresh >= 1,
              "candidates_per_prompt": o.candidates_per_prompt >= 2,
              "online_min_margin": o.online_min_margin >= 0,
              "offline_mix": 0 <= o.offline_mix < 1}
    shown = {"refresh_every_n_steps": ">= 1", "prompts_per_refresh": ">= 1",
             "candidates_per_prompt": ">= 2 (a pair needs two)", "online_min_margin": ">= 0",
             "offline_mix": "in [0, 1)"}
    problems += [f"'{key}' must be {shown[key]}, got {getattr(o, key)}"
                 for key, ok in ranges.items() if not ok]
    if not o.online_rewards:
        problems.append("online_prompts needs 'online_rewards' to score the candidates, e.g. "
                        "online_rewards = [\"pickscore=/models/PickScore_v1\"]")
    if o.online_pair_strategy not in ONLINE_STRATEGIES:
        problems.append(f"'online_pair_strategy' must be one of {', '.join(ONLINE_STRATEGIES)}, "
                        f"got '{o.online_pair_strategy}'")
    if o.pool_size < t.train_batch_size:
        problems.append(f"'pool_size' = {o.pool_size} holds fewer pairs than one batch "
                        f"(train_batch_size = {t.train_batch_size})")
    if o.offline_mix > 0 and not d.train_data:
        problems.append("offline_mix > 0 draws batches from train_data: set train_data to the "
                        "offline pairs, or offline_mix = 0")
    problems += [f"{what} cannot be used online (the pool's pairs change at every refresh); "
                 f"set {fix}" for what, fix, bad in (
                     ("cache_latents", "cache_latents = false", d.cache_latents
                      or d.cache_latents_to_disk),
                     ("cache_text_encoder_outputs", "cache_text_encoder_outputs = false",
                      d.cache_text_encoder_outputs),
                     ("reference = \"cached\"", "reference = \"auto\"", t.reference == "cached"),
                     ("max_train_epochs", "max_train_steps instead", t.max_train_epochs > 0),
                     ("skip_masked_timesteps", "skip_masked_timesteps = false",
                      t.skip_masked_timesteps))
                 if bad]
    return problems



def reads_train_data(config) -> bool:
    """Whether a run reads train_data's pairs: offline runs, and online runs with offline_mix."""
    return not config.online.enabled or config.online.offline_mix > 0
