"""The trained network written where users' tools load it: a LoRA file with sd-scripts'
``ss_*`` metadata (or a diffusers folder for full fine-tuning), at the end of a run, every N
steps (saving.py) and when a run stops early."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..export import build_metadata
from .config import Config
from .result import TrainResult, lora_state
from .run_folder import RUN_ID_KEY
from .stopping import INTERRUPTED_SUFFIX


def clip_or_image_size(config: Config) -> int | tuple[int, int]:
    """The trained size for the metadata: (video_height, video_width) for video families."""
    d = config.data
    return (d.video_height, d.video_width) if d.num_frames else d.resolution


def lora_metadata(config: Config, result: TrainResult) -> dict[str, str]:
    """sd-scripts ``ss_*`` training metadata plus the objective and its hyper-parameters."""
    t = config.training
    objective = result.objective
    extra = {"ss_objective": objective.name}
    if result.run_id:
        extra[RUN_ID_KEY] = result.run_id
    for key, value in objective.hyperparameters().items():
        extra[f"ss_objective_{key}"] = str(value)
    extra["ss_dpo_beta"] = str(objective.hyperparameters().get("beta", ""))
    extra["ss_save_precision"] = config.export.save_precision
    extra.update(result.adapter.network_metadata(config))
    return build_metadata(
        network_dim=config.network.network_dim, network_alpha=config.network.network_alpha,
        learning_rate=t.learning_rate, num_train_images=2 * result.num_pairs, steps=result.steps,
        training_started_at=result.started_at, output_name=t.output_name,
        mixed_precision=t.mixed_precision, seed=t.seed, optimizer=result.optimizer,
        lr_scheduler=t.lr_scheduler, resolution=clip_or_image_size(config),
        sd_model_name=config.model.pretrained_model_name_or_path,
        prediction_type=result.adapter.prediction_type,
        base_model_version=result.adapter.base_model_version,
        architecture=result.adapter.modelspec_architecture, extra=extra)


def save_dtype(config: Config):
    """[export] save_precision as a torch dtype (fp16, bf16, float = float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16,
            "float": torch.float32}[config.export.save_precision]


def export(config: Config, result: TrainResult, name: str = "") -> Path:
    """The LoRA file <output_dir>/<name>.safetensors (finetune = "lora") or, for full fine-tuning,
    the whole pipeline as a diffusers folder <output_dir>/<name>/ (with sipo_training.json holding
    the metadata); ``name`` defaults to output_name."""
    t = config.training
    name = name or t.output_name
    if config.network.finetune == "full":
        written = result.adapter.export_full(Path(t.output_dir) / name,
                                             metadata=lora_metadata(config, result),
                                             save_dtype=save_dtype(config))
        tqdm.write(f"fine-tuned model (diffusers folder) written to {written}")
        return Path(written)
    suffix = ".safetensors" if config.export.lora_format == "kohya" else ""
    path = Path(t.output_dir) / f"{name}{suffix}"
    n = config.network
    # LoCon and started-from-file LoRAs carry per-module alphas: each module's own is exported
    uniform_alpha = None if (n.conv_dim or n.network_weights) else n.network_alpha
    written = result.adapter.export_lora(path, lora_format=config.export.lora_format,
                                         network_alpha=uniform_alpha,
                                         metadata=lora_metadata(config, result),
                                         save_dtype=save_dtype(config))
    tqdm.write(f"LoRA ({config.export.lora_format} format) written to {written}")
    return Path(written)


def save_interrupted(config: Config, result: TrainResult | None) -> Path | None:
    """The LoRA of a run stopped after a step, as ``<output_name>-interrupted`` (main process;
    not when its weights are NaN/inf). A failure here is reported, never hides the first error."""
    if result is None or not result.accelerator.is_main_process:
        return None
    if not all(torch.isfinite(v).all() for v in lora_state(result.adapter).values()):
        tqdm.write(f"stopped at step {result.steps}: the trained weights are NaN/inf, not saved")
        return None
    try:
        path = export(config, result, name=config.training.output_name + INTERRUPTED_SUFFIX)
    except Exception as err:  # noqa: BLE001  (the original error is the one to report)
        tqdm.write(f"stopped at step {result.steps}; saving its LoRA failed too: {err}")
        return None
    tqdm.write(f"stopped at step {result.steps}: the LoRA so far is saved as {path}")
    return path
