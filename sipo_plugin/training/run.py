"""A whole run: (toy pairs) -> train -> export -> (toy evaluation)."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from .config import Config
from .loop import TrainResult, train, use_cpu
from .run_folder import RUN_ID_KEY


def clip_or_image_size(config: Config) -> int | tuple[int, int]:
    """The trained size for the metadata: (video_height, video_width) for video families."""
    d = config.data
    return (d.video_height, d.video_width) if d.num_frames else d.resolution


def lora_metadata(config: Config, result: TrainResult) -> dict[str, str]:
    """sd-scripts ``ss_*`` training metadata plus the objective and its hyper-parameters."""
    from ..export import build_metadata
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
    import torch
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


def run(config: Config) -> dict:
    """Run the configured job; returns paths and, for the toy world, the evaluation."""
    start = time.time()
    if config.toy.generate_pairs:
        from accelerate import PartialState
        from .toy_world import ensure_toy_pairs
        with PartialState(cpu=use_cpu(config.training)).main_process_first():  # the others then find the pairs ready
            ensure_toy_pairs(config)
    result = train(config)
    if not result.accelerator.is_main_process:  # with several processes, one writes the outputs
        return {}
    summary = {"lora": str(export(config, result)), "metrics": str(result.metrics_log)}
    if config.toy.evaluate:
        from .toy_world import evaluate_run
        summary["eval"] = evaluate_run(config, result)
    summary["wall_time_s"] = round(time.time() - start, 1)
    tqdm.write(f"done in {summary['wall_time_s']} s; outputs in {config.training.output_dir}")
    return summary
