"""``network_weights``: the run's network settings taken from the LoRA file it starts from.

Read before anything loads (the safetensors header only, no torch): the file's rank, alpha, conv
rank / alpha (LoCon), DoRA and text encoders replace the preset's, so the config that trains,
checkpoints and writes the metadata says what is trained. Differences from the preset are named
in one note; a file of another family, a DoRA file for a LoRA run (or the reverse) and a file
that is not LoRA are one-line errors.
"""

from __future__ import annotations

import dataclasses

from ..export.lora_file import LoraFileError, network_weights_file, summarize_lora_file


def _family_problem(summary, family: str) -> str | None:
    """Why a file of ``summary`` cannot start a run of ``family`` (None: it can)."""
    if family == "sd15" and summary.sdxl_names:
        return ("an SDXL LoRA (lora_te1/lora_te2, text_encoder_2 or input_blocks keys); the "
                "preset's family is sd15: set family = \"sdxl\" or give an SD1.x LoRA")
    if family == "sdxl" and summary.sd1_names:
        return ("an SD1.x LoRA (one text encoder, lora_te_ keys); the preset's family is sdxl: "
                "set family = \"sd15\" or give an SDXL LoRA")
    return None


def network_from_file(config):
    """(network settings of ``config`` with the file's values, [(key, file value, preset value)]
    for each setting that changed); raises LoraFileError (one line)."""
    n = config.network
    file = network_weights_file(n.network_weights)
    summary = summarize_lora_file(file)
    problem = _family_problem(summary, config.model.family)
    if problem:
        raise LoraFileError(f"network_weights {file}: {problem}")
    if summary.dora and not n.use_dora:
        raise LoraFileError(f"network_weights {file}: a DoRA file (dora_scale / magnitude keys) "
                            "given where LoRA is expected; set use_dora = true to refine it as DoRA")
    if n.use_dora and not summary.dora:
        raise LoraFileError(f"network_weights {file}: a plain LoRA (no dora_scale keys) but "
                            "use_dora = true; set use_dora = false to refine it as LoRA")
    values = {"train_text_encoder": any(c != "unet" for c in summary.components),
              "conv_dim": summary.conv_rank}
    if summary.rank:
        values.update(network_dim=summary.rank, network_alpha=summary.alpha)
    if summary.conv_rank:
        values["conv_alpha"] = summary.conv_alpha
    changed = [(key, value, getattr(n, key)) for key, value in values.items()
               if value != getattr(n, key)]
    return dataclasses.replace(n, **values), changed


def resolve_network_weights(config, note=print):
    """``config`` with its network taken from ``network_weights`` (unchanged without one)."""
    if not config.network.network_weights:
        return config
    network, changed = network_from_file(config)
    if changed:
        listed = ", ".join(f"{key} {_shown(new)} (preset: {_shown(old)})" for key, new, old in changed)
        note(f"note: network_weights {network_weights_file(network.network_weights)} sets {listed}; "
             "the file's values are used")
    return dataclasses.replace(config, network=network)


def _shown(value) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" \
        if isinstance(value, float) else str(value)


__all__ = ["LoraFileError", "network_from_file", "resolve_network_weights"]
