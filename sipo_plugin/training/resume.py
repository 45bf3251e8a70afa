"""Resume checks what it resumes: the checkpoint's settings against the run's, one line.

A resumed run continues the checkpoint's training: the same network (shape, targets, family,
finetune mode), objective and hyper-parameters, optimizer, learning-rate schedule, data and
seed. A change to any of those would train something no single setting describes (the LoRA
metadata would claim the new value), so it is refused, naming every setting with both values.
Settings that only say how long, where, how often or on what hardware are applied (a changed
``max_train_steps`` extends or shortens the run: the LR schedule follows the new length) and
reported.
"""

from __future__ import annotations

from pathlib import Path

from ..objectives import get_objective
from .checkpoint import CheckpointError
from .config import Config

# (section, key) that may differ between the checkpoint and the resumed run: applied, reported
APPLIED = {
    "model": {"pretrained_model_name_or_path", "model_config", "group_offload", "vae_tiling",
              "vae_slicing"},
    "data": {"dataloader_num_workers", "skip_data_check", "cache_dir", "cache_latents_to_disk",
             "cache_text_encoder_outputs"},
    "training": {"output_dir", "output_name", "resume", "overwrite", "max_train_steps",
                 "max_train_epochs",
                 "save_every_n_steps", "save_last_n", "logging_steps", "log_with", "cpu",
                 "gradient_checkpointing", "xformers", "reference_device", "calibration_pairs",
                 "sample_every_n_steps", "sample_prompts", "sample_seed", "sample_steps",
                 "sample_guidance_scale"},
    "export": None,  # every key: the export happens after training
    "toy": None,  # the toy world's pair generation is checked through the data fingerprint
    "sampling": None,  # candidate and evaluation sampling, not training
}


def _resolved_objective(section: dict) -> dict:
    """An [objective] section -> {"objective": name, every hyper-parameter with its default}."""
    hyperparameters = {k: v for k, v in section.items() if k != "name"}
    try:
        resolved = get_objective(section["name"], **hyperparameters).hyperparameters()
    except (KeyError, ValueError, TypeError):  # an objective no longer registered: compare as is
        resolved = hyperparameters
    return {"objective": section["name"], **resolved}


def setting_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Two resolved configs (Config.to_dict) -> (refused, applied) differences, each
    "key = checkpoint value (now current value)". A key one of them lacks (a setting added in a
    later version) is not compared."""
    refused, applied = [], []
    for section, values in current.items():
        old = saved.get(section, {})
        if section == "objective":
            values, old = _resolved_objective(values), _resolved_objective(old)
        allowed = APPLIED.get(section, set())
        for key, value in values.items():
            if key in old and old[key] != value:
                line = f"{key} = {old[key]!r} (now {value!r})"
                (applied if allowed is None or key in allowed else refused).append(line)
    return refused, applied


def check_resume(config: Config, checkpoint: dict, path: Path, data: dict, log) -> None:
    """Refuse a resume whose settings or pair list differ from the checkpoint's (one line naming
    each); report the applied differences."""
    refused, applied = setting_changes(checkpoint["config"], config.to_dict())
    saved_data = checkpoint.get("data", {})
    if saved_data and saved_data != data:
        refused.append(f"the pair list of train_data = {saved_data['pairs']} pairs "
                       f"(sha256 {saved_data['sha256'][:12]}) (now {data['pairs']} pairs, "
                       f"sha256 {data['sha256'][:12]})")
    if refused:
        raise CheckpointError(
            f"cannot resume {path}: it was trained with {'; '.join(refused)}. Resume with the "
            "checkpoint's settings, or start a new run in another output_dir")
    if applied:
        log(f"resuming {path} with changed settings (applied): {'; '.join(applied)}")
