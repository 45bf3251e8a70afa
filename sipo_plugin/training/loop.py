"""The training loop: orchestration only; the math is in sipo_plugin.objectives.

One step (``train_step``) reads top to bottom:
encode -> shared noise and t -> policy prediction -> reference prediction (adapter off) ->
objective -> backward -> clip / step / zero_grad when gradients sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..data import PairBatchSampler, PairDataset, collate_pairs, read_pairs
from ..models import get_model_adapter
from ..models.base import ModelAdapter
from ..objectives import calibrate_kappa, get_objective, per_sample_error
from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from .config import Config
from .metrics import MetricsLogger

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    adapter: ModelAdapter
    objective: object
    accelerator: Accelerator
    steps: int
    num_pairs: int
    started_at: float
    metrics_log: Path
    last_metrics: dict = field(default_factory=dict)


def make_dataloader(config: Config, records, *, total: int, start: int = 0):
    """Micro-batches ``start`` .. ``total`` of the run's fixed data order (see PairBatchSampler)."""
    sampler = PairBatchSampler(len(records), config.training.train_batch_size,
                               seed=config.training.seed, total=total, start=start)
    return torch.utils.data.DataLoader(
        PairDataset(records, config.data.resolution), batch_sampler=sampler,
        collate_fn=collate_pairs, num_workers=config.data.dataloader_num_workers)


def progress_fields(metrics: dict) -> dict:
    """What the progress bar shows: loss, implicit accuracy and reward margin when reported."""
    shown = {"loss": ("loss", "{:.4f}"), "acc": ("implicit_acc", "{:.2f}"),
             "margin": ("rewards/margins", "{:.2e}")}
    return {label: fmt.format(metrics[key]) for label, (key, fmt) in shown.items() if key in metrics}


def train_step(batch: dict, adapter: ModelAdapter, objective, accelerator: Accelerator,
               optimizer, lr_scheduler, params, max_grad_norm: float,
               generator: torch.Generator) -> dict:
    """One micro-batch of B pairs laid out as 2B samples, winners first."""
    with accelerator.accumulate(*adapter.trainable_modules()):
        # encode images and prompts; the prompt is shared by winner and loser
        latents = adapter.encode_images(batch["pixel_values"], generator)
        cond = adapter.pair_conditioning(adapter.encode_prompts(batch["prompts"]), batch)
        # one noise and one timestep per pair
        noisy = adapter.noisy_inputs(latents, generator)
        # policy: the model with its LoRA
        with accelerator.autocast():
            model_pred = adapter.predict(noisy.noisy, noisy.timesteps, cond)
        # reference: the same weights with the adapter disabled
        with torch.no_grad(), adapter.reference(), accelerator.autocast():
            ref_cond = (adapter.pair_conditioning(adapter.encode_prompts(batch["prompts"]), batch)
                        if adapter.trains_text_encoder else cond)
            ref_pred = adapter.predict(noisy.noisy, noisy.timesteps, ref_cond)
        # the objective, by name
        out = objective(model_pred, ref_pred, noisy.target, noisy.timesteps, adapter.noise_scheduler)
        loss = weighted_pair_loss(out, batch["weights"].to(out.loss.device))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} (metrics: {out.metrics}); lower learning_rate or beta, "
                "or use mixed_precision = \"no\"")
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return out.metrics


def weighted_pair_loss(out, weights: torch.Tensor) -> torch.Tensor:
    """The objective's mean loss, or, when the data gives per-pair weights, their weighted mean."""
    if torch.all(weights == 1):
        return out.loss
    return (out.per_pair_loss * weights).sum() / weights.sum()


@torch.no_grad()
def calibrate(objective, adapter: ModelAdapter, loader, generator) -> float:
    """kappa = 'auto': reference errors on a few batches -> the kappa hitting the mask target."""
    errors, timesteps = [], []
    with adapter.reference():
        for batch in loader:
            latents = adapter.encode_images(batch["pixel_values"], generator)
            noisy = adapter.noisy_inputs(latents, generator)
            cond = adapter.pair_conditioning(adapter.encode_prompts(batch["prompts"]), batch)
            errors.append(per_sample_error(adapter.predict(noisy.noisy, noisy.timesteps, cond),
                                           noisy.target))
            timesteps.append(noisy.timesteps)
    cfg = objective.config
    return calibrate_kappa(errors, timesteps, adapter.noise_scheduler,
                           mask_threshold=cfg.mask_threshold,
                           target_mask_fraction=cfg.target_mask_fraction)


def lora_state(adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) tensors of every trainable module, by a stable name."""
    return {f"{i}.{name}": p.detach().cpu().clone()
            for i, module in enumerate(adapter.trainable_modules())
            for name, p in module.named_parameters() if p.requires_grad}


def load_lora_state(adapter: ModelAdapter, state: dict[str, torch.Tensor]) -> None:
    current = dict(lora_state(adapter))
    if current.keys() != state.keys():
        raise ValueError("the checkpoint's LoRA does not match this run's network settings "
                         "(network_dim, targets, train_text_encoder)")
    for i, module in enumerate(adapter.trainable_modules()):
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.data.copy_(state[f"{i}.{name}"])


def objective_for_run(config: Config, adapter, records, checkpoint, generator, log):
    """The configured objective; kappa = 'auto' is calibrated once (or restored on resume)."""
    if checkpoint is not None:
        return get_objective(checkpoint["objective_name"], **checkpoint["objective_hyperparameters"])
    objective = get_objective(config.objective.name, **config.objective.hyperparameters)
    if objective.needs_calibration:
        t = config.training
        loader = make_dataloader(config, records, total=min(t.calibration_batches,
                                                            len(records) // t.train_batch_size))
        kappa = calibrate(objective, adapter, loader, generator)
        objective = objective.with_kappa(kappa)
        log.info(f"kappa = 'auto' calibrated to {kappa:.6g} (masks "
                 f"{objective.config.target_mask_fraction:.0%} of pairs at w < "
                 f"{objective.config.mask_threshold})")
        log.event("calibration", kappa=kappa)
    return objective


def save_training_state(config: Config, step: int, adapter, objective, optimizer, lr_scheduler,
                        generator) -> Path:
    return save_checkpoint(config.training.output_dir, step, {
        "step": step, "lora": lora_state(adapter), "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(), "noise_generator": generator.get_state(),
        "objective_name": objective.name, "objective_hyperparameters": objective.hyperparameters(),
        "config": config.to_dict()}, keep_last=config.training.save_last_n)


def train(config: Config) -> TrainResult:
    """Train a LoRA with the configured objective; returns the trained adapter (not yet exported)."""
    t = config.training
    started_at = time.time()
    output_dir = Path(t.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # a process may run several trainings (tests, benchmarks): accelerate's state is a singleton
    # that refuses a new mixed-precision setting, so drop it (the distributed setup is kept)
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=t.cpu,
                              gradient_accumulation_steps=t.gradient_accumulation_steps,
                              log_with=None if t.log_with == "none" else t.log_with,
                              project_dir=str(output_dir))
    set_seed(t.seed)
    log = MetricsLogger(output_dir / "metrics.jsonl", accelerator, t.log_with, config.to_dict())
    resume_from = resolve_resume(t.resume, output_dir)
    checkpoint = load_checkpoint(resume_from) if resume_from else None
    start = checkpoint["step"] if checkpoint else 0

    records = read_pairs(config.data.train_data, caption_extension=config.data.caption_extension)
    if len(records) < t.train_batch_size:
        raise ValueError(f"{config.data.train_data}: {len(records)} pairs, fewer than "
                         f"train_batch_size = {t.train_batch_size}")
    log.info(f"{len(records)} pairs from {config.data.train_data}")
    adapter = get_model_adapter(config.model.family).load(
        config.model, device=accelerator.device, weight_dtype=WEIGHT_DTYPES[accelerator.mixed_precision])
    generator = torch.Generator(device="cpu").manual_seed(t.seed)
    params = adapter.add_lora(config.network)
    # the adapter starts as an exact no-op (lora_up = 0), so calibration sees the reference
    objective = objective_for_run(config, adapter, records, checkpoint, generator, log)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.max_train_steps)
    if checkpoint is not None:
        load_lora_state(adapter, checkpoint["lora"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        generator.set_state(checkpoint["noise_generator"])
        log.info(f"resumed from {resume_from} at step {start}")
    micro = t.gradient_accumulation_steps
    loader = make_dataloader(config, records, total=t.max_train_steps * micro, start=start * micro)
    *_, optimizer, loader, lr_scheduler = accelerator.prepare(
        *adapter.trainable_modules(), optimizer, loader, lr_scheduler)

    log.info(f"training {sum(p.numel() for p in params):,} LoRA parameters with '{objective.name}' "
             f"for {t.max_train_steps} steps, {t.train_batch_size} pairs x {micro} accumulation")
    progress = tqdm(total=t.max_train_steps, initial=start, desc=objective.name, unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    step = start
    for batch in loader:
        metrics = train_step(batch, adapter, objective, accelerator, optimizer, lr_scheduler,
                             params, t.max_grad_norm, generator)
        log.accumulate(metrics)
        if not accelerator.sync_gradients:
            continue
        step += 1
        progress.update(1)
        progress.set_postfix(progress_fields(metrics), refresh=False)
        if step % t.logging_steps == 0 or step == t.max_train_steps:
            log.flush(step, lr=lr_scheduler.get_last_lr()[0])
        if t.save_every_n_steps and (step % t.save_every_n_steps == 0 or step == t.max_train_steps):
            if accelerator.is_main_process:
                save_training_state(config, step, adapter, objective, optimizer, lr_scheduler,
                                    generator)
    progress.close()
    log.close()
    return TrainResult(adapter=adapter, objective=objective, accelerator=accelerator, steps=step,
                       num_pairs=len(records), started_at=started_at,
                       metrics_log=output_dir / "metrics.jsonl", last_metrics=log.last)
