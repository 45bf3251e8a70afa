"""What the toy world registers, so that the trainer reaches it only through registries: the name
"toy" for its bundled SD1.5 pipeline (``pretrained_model_name_or_path = "toy"``, with its fidelity
in eval.json) and for its 54 prompts (``pairs_prompts`` / ``eval_prompts = "toy"``). Torch-free:
the config checks resolve the name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..models.families import NamedModel, register_named_model
from ..pairs.prompts import register_prompt_set
from .domain import all_prompts
from .fidelity import fidelity

TOY = "toy"
TOY_MODEL_DIR = Path(__file__).resolve().parent / "model"  # = sipo_plugin.toy.pipeline's


def fidelity_stats(base: list, tuned: list, prompts: list[str]) -> dict:
    """eval.json's base_fidelity / tuned_fidelity: the share of samples whose colour, shape and
    background obey the prompt (samples: `sipo_plugin.pairs.sampler.Sample`)."""
    def share(samples: list) -> float:
        images = np.stack([np.asarray(s.frames[0].convert("RGB")) for s in samples])
        return float(fidelity(images, prompts).mean())
    return {"base_fidelity": share(base), "tuned_fidelity": share(tuned)}


register_named_model(TOY, NamedModel("sd15", TOY_MODEL_DIR, evaluation_stats=fidelity_stats))
register_prompt_set(TOY, all_prompts)
