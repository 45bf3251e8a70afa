"""Reward models behind a registry, the same pattern as the objectives.

    from sipo_plugin.rewards import build_reward, combine_scores
    reward = build_reward("pickscore=/models/PickScore_v1", device="cuda")
    scores = reward.score(images, prompts)            # float32 [N] on the CPU, higher is better
    clip_scores = reward.score_clips(clips, prompts, every_k=4)

Built-ins: ``pickscore``, ``clip``, ``aesthetic`` (local model folders), the toy world's
``colour`` / ``geometry`` / ``size`` / ``centred``, ``hpsv2`` and ``imagereward`` (when their
packages import), and ``package.module:function`` (your own code). More through the entry-point
group ``sipo_plugin.rewards``. Spec strings: see `sipo_plugin.rewards.registry`.
"""

from .base import Reward, RewardError, combine_scores, zscores
from .registry import (
    ENTRY_POINT_GROUP,
    RewardSpec,
    available_rewards,
    build_reward,
    default_device,
    describe_rewards,
    parse_reward_spec,
    register_reward,
)

# Built-in rewards register themselves on import.
from . import aesthetic, clip, external, toy  # noqa: E402,F401

__all__ = [
    "ENTRY_POINT_GROUP", "Reward", "RewardError", "RewardSpec", "available_rewards",
    "build_reward", "combine_scores", "default_device", "describe_rewards", "parse_reward_spec",
    "register_reward", "zscores",
]
