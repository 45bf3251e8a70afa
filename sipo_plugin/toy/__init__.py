"""The toy world: a synthetic shapes domain, a tiny bundled SD1.5-architecture pipeline trained on
it, computable rewards and a before/after evaluator (pairs come from `sipo_plugin.pairs`).

Light imports only here (numpy, Pillow); the torch / diffusers parts load on first use:

    from sipo_plugin.toy import load_toy_pipeline, sample_images
"""

from __future__ import annotations

from .domain import all_prompts, parse_prompt, render
from .evaluate import eval_set, evaluate, save_grid
from .fidelity import fidelity
from .rewards import available_rewards, get_reward
from ..utils.lazy import lazy_getattr

_LAZY = {
    "TOY_MODEL_DIR": "pipeline",
    "DEFAULT_GUIDANCE": "pipeline",
    "DEFAULT_STEPS": "pipeline",
    "load_toy_pipeline": "pipeline",
    "sample_images": "pipeline",
    "build_tokenizer": "tokenizer",
}

__all__ = [
    "all_prompts", "parse_prompt", "render", "eval_set", "evaluate", "save_grid", "fidelity",
    "available_rewards", "get_reward", *_LAZY,
]

__getattr__ = lazy_getattr(__name__, _LAZY, globals())
