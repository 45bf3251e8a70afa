"""A whole run: ([pairs]: sample -> score -> make) -> train -> export -> ([evaluate])."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from .config import Config
from .loop import TrainResult, train, use_cpu
from .stopping import INTERRUPTED_SUFFIX
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


def save_interrupted(config: Config, result: TrainResult | None) -> Path | None:
    """The LoRA of a run stopped after a step, as ``<output_name>-interrupted`` (main process;
    not when its weights are NaN/inf). A failure here is reported, never hides the first error."""
    if result is None or not result.accelerator.is_main_process:
        return None
    from .loop import lora_state
    import torch
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


def run(config: Config) -> dict:
    """Run the configured job; returns paths and, with eval_after_training, the evaluation."""
    start = time.time()
    if config.pairs.pairs_prompts:
        from accelerate import PartialState
        from ..pairs.onpolicy import make_training_pairs
        with PartialState(cpu=use_cpu(config.training)).main_process_first():  # the others then find the pairs ready
            make_training_pairs(config)
    try:
        result = train(config)
    except BaseException as err:
        save_interrupted(config, getattr(err, "interrupted", None))
        raise
    if not result.accelerator.is_main_process:  # with several processes, one writes the outputs
        return {}
    summary = {"lora": str(export(config, result)), "metrics": str(result.metrics_log)}
    if config.evaluate.eval_after_training:
        from ..evaluation import evaluate_run
        base = None
        if config.network.finetune == "full":  # no adapter to switch off: sample a fresh base
            adapter = result.adapter
            base = type(adapter).load(config.model, device=adapter.device)
        summary["eval"] = evaluate_run(config, result.adapter, base_adapter=base,
                                       objective=result.objective.name)
    summary["wall_time_s"] = round(time.time() - start, 1)
    tqdm.write(f"done in {summary['wall_time_s']} s; outputs in {config.training.output_dir}")
    return summary


def evaluate_only(config: Config) -> dict:
    """``--evaluate``: the preset's model without and with a LoRA (eval_network_weights, else the
    run's export), no training."""
    import torch
    from ..evaluation import evaluate_run
    from ..pairs.sample import load_sampling_adapter
    t = config.training
    lora = config.evaluate.eval_network_weights or str(Path(t.output_dir) / f"{t.output_name}.safetensors")
    if not Path(lora).is_file():
        raise ValueError(f"--evaluate: LoRA not found: {lora} (train first, or set "
                         "eval_network_weights)")
    adapter = load_sampling_adapter(config.model, cpu=use_cpu(t) or not torch.cuda.is_available(),
                                    network_weights=lora)
    Path(t.output_dir).mkdir(parents=True, exist_ok=True)
    return evaluate_run(config, LoadedLoRA(adapter))


class LoadedLoRA:
    """An adapter whose LoRA was loaded by the pipeline (``load_lora_weights``): the base is the
    same modules with diffusers' adapters disabled."""

    def __init__(self, adapter):
        self.inner = adapter

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def reference(self):
        import contextlib

        @contextlib.contextmanager
        def off():
            pipe = self.inner.sampling_pipeline()
            pipe.disable_lora()
            try:
                yield
            finally:
                pipe.enable_lora()
        return off()
