"""The training loop: orchestration only (setup -> train -> cleanup); the math is in
sipo_plugin.objectives.

One step (``train_step``): the pair batch's policy and reference errors (training/forward.py:
encode or read the caches -> shared noise and t -> policy prediction -> reference errors from
the reference training/reference.py chose) -> objective -> backward -> clip / step / zero_grad
when gradients sync. Before the first step: caches, the calibration hook (training/calibration.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..data import read_pairs
from ..data.batch import PairBatch
from ..data.loader import make_dataloader
from ..models import get_model_adapter
from ..models.base import ModelAdapter
from ..utils.seeding import seeded_generator  # noqa: F401  (re-exported: tests key draws with it)
from .calibration import (calibration_pairs, first_timestep_for_run,  # noqa: F401 (re-exported)
                          calibration_sample, objective_for_run, run_calibration_sample,
                          timestep_share)
from .checkpoint import load_checkpoint, resolve_resume
from .config import Config
from .distributed import (gather_full_weights, make_accelerator, parallelism, prepare_training,
                          resume_sharded, sync_modules)
from .forward import PairDraws, batch_draws, pair_forward
from .precompute import prepare_caches
from .reference import AdapterOffReference, live_reference, make_reference
from .memory import (build_optimizer, cast_trainable_to_bf16, compile_trained_network,
                     enable_gradient_checkpointing, enable_xformers, optimizer_name, param_groups)
from .metrics import MetricsLogger
from .nonfinite import LossWatch, NonFiniteLossError, check_base_weights  # noqa: F401 (re-exported)
from .online import OnlineSource, calibration_needed
from .online_config import reads_train_data
from .stopping import remove_stale_temp_files
from .sampling import save_samples
from .run_folder import folder_run_id
from .saving import save_training_state, start_run
from .result import TrainResult, lora_state  # noqa: F401  (lora_state: re-exported)
from ..data.saved_latents import use_saved_latents
from ..evaluation.holdout import training_records
from ..evaluation.hooks import TrainingEvaluation

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}




def use_cpu(training) -> bool:
    """accelerate's CPU mode: asked for, or several processes without a GPU (torchrun on CPU),
    where it sets up gloo; without it each process would silently train alone."""
    several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return training.cpu or (several_processes and not torch.cuda.is_available())


def progress_fields(metrics: dict, prefix: str = "") -> dict:
    """What the progress bar shows: loss, implicit accuracy and reward margin when reported."""
    shown = {"loss": ("loss", "{:.4f}"), "acc": ("implicit_acc", "{:.2f}"),
             "margin": ("rewards/margins", "{:.2e}")}
    return {label: fmt.format(metrics[prefix + key]) for label, (key, fmt) in shown.items()
            if prefix + key in metrics}


def train_step(batch: PairBatch, adapter: ModelAdapter, objective, accelerator: Accelerator,
               optimizer, lr_scheduler, params, max_grad_norm: float, draws: PairDraws,
               reference=None, loss_scale: float = 1.0) -> dict:
    """One micro-batch of B pairs laid out as 2B samples, winners first. ``reference``: the run's
    (training/reference.py; None: the LoRA's adapter-off base); an objective that needs no
    reference runs none. Returns the objective's metrics as detached tensors (no host sync;
    ``float()`` reads one). ``loss_scale`` multiplies the loss."""
    with accelerator.accumulate(*sync_modules(adapter)):
        # policy and reference errors of the 2B samples: training/forward.py
        reference = (reference or AdapterOffReference()) if objective.needs_reference else None
        errors = pair_forward(adapter, batch, draws, reference=reference,
                              autocast=accelerator.autocast)
        # the objective, by name (objective(...) on predictions computes exactly these errors)
        out = objective.from_errors_on_device(errors.policy, errors.reference,
                                              errors.timesteps[:batch.num_pairs],
                                              adapter.noise_scheduler)
        loss = weighted_pair_loss(out, batch.weights) * loss_scale
        accelerator.backward(loss)  # several processes: DDP / FSDP / DeepSpeed sync the gradients
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {**out.metrics, "loss": out.metrics["loss"] * loss_scale}


def weighted_pair_loss(out, weights: torch.Tensor) -> torch.Tensor:
    """The objective's mean loss, or, when the data gives per-pair weights, their weighted mean
    (``weights`` as the batch holds them: on the CPU, so the check costs no device sync)."""
    if torch.all(weights == 1):
        return out.loss
    weights = weights.to(out.per_pair_loss.device)
    return (out.per_pair_loss * weights).sum() / weights.sum()




def load_lora_state(adapter: ModelAdapter, state: dict[str, torch.Tensor]) -> None:
    current = dict(lora_state(adapter))
    if current.keys() != state.keys() or any(current[k].shape != v.shape for k, v in state.items()):
        raise ValueError("the checkpoint's trainable weights do not match this run's network "
                         "settings (finetune, network_dim, targets, train_text_encoder)")
    for i, module in enumerate(adapter.trainable_modules()):
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.data.copy_(state[f"{i}.{name}"])


def with_epoch_steps(config: Config, records, num_processes: int) -> Config:
    """max_train_epochs > 0 (sd-scripts): max_train_steps = epochs x ceil(micro-batches per epoch /
    (gradient_accumulation_steps x processes)); an epoch is one pass over the pairs (repeats
    included, a partial last batch dropped)."""
    t = config.training
    per_epoch = make_dataloader(config, records, total=1).batch_sampler.per_epoch
    steps = t.max_train_epochs * math.ceil(per_epoch / (t.gradient_accumulation_steps * num_processes))
    return dataclasses.replace(config, training=dataclasses.replace(t, max_train_steps=steps))


def make_lr_scheduler(optimizer, training, num_processes: int):
    """The configured LR schedule. accelerate's prepared scheduler ticks once per process at each
    optimizer step, so warm-up and length are given in those ticks (num_processes x steps): every
    process count then sees the same learning rate at step s."""
    return get_scheduler(training.lr_scheduler, optimizer,
                         num_warmup_steps=training.lr_warmup_steps * num_processes,
                         num_training_steps=training.max_train_steps * num_processes)


def check_before_model_load(config: Config, records) -> None:
    """The start-up checks that read files (training/checks.py): the model folder against
    ``family``, and every image of the pair data decodes (unless skip_data_check), so bad data
    found late never costs a run."""
    from ..data.check import check_images
    from .checks import model_family_problems
    from .config import ConfigError
    problems = model_family_problems(config)
    if problems:
        raise ConfigError(problems)
    if not (config.data.skip_data_check or config.data.num_frames):
        check_images(records)


def train(config: Config) -> TrainResult:
    """Train a LoRA with the configured objective; returns the trained adapter (not yet exported).

    When an error (or Ctrl-C / SIGTERM) stops training after a step, the exception carries
    ``interrupted``: the TrainResult so far, whose LoRA run.py saves before re-raising."""
    so_far: dict = {}
    try:
        return _train(config, so_far)
    except BaseException as err:
        if so_far.get("steps", 0) > so_far.get("start", 0):
            err.interrupted = TrainResult(**{k: v for k, v in so_far.items() if k != "start"})
        raise


def _train(config: Config, so_far: dict) -> TrainResult:
    t = config.training
    started_at = time.time()
    output_dir = Path(t.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # a process may run several trainings (tests, benchmarks): accelerate's state is a singleton
    # that refuses a new mixed-precision setting, so drop it (the distributed setup is kept)
    AcceleratorState._reset_state()
    accelerator = make_accelerator(config, cpu=use_cpu(t), project_dir=str(output_dir))
    set_seed(t.seed)
    if accelerator.is_main_process:  # a killed run's half-written files (this output_dir only)
        remove_stale_temp_files(output_dir)
    resume_from = resolve_resume(t.resume, output_dir, folder_run_id(output_dir))
    checkpoint = load_checkpoint(resume_from) if resume_from else None
    start = checkpoint["step"] if checkpoint else 0

    records = (read_pairs(config.data.train_data, caption_extension=config.data.caption_extension)
               if reads_train_data(config) else [])  # online without offline_mix: the pool only
    records = training_records(config, records)  # without the prompts held out for evaluation
    records = use_saved_latents(  # candidates' latents instead of a VAE encode, when they fit
        config, records, tqdm.write if accelerator.is_main_process else None)
    if len(records) < t.train_batch_size and reads_train_data(config):
        raise ValueError(f"{config.data.train_data}: {len(records)} pairs, fewer than "
                         f"train_batch_size = {t.train_batch_size}")
    if t.max_train_epochs:
        config = with_epoch_steps(config, records, accelerator.num_processes)
        t = config.training
    # before anything is written: the resume's settings and the folder's owner are checked
    run = start_run(config, checkpoint, resume_from, records, accelerator)
    log = MetricsLogger(output_dir / "metrics.jsonl", accelerator, t.log_with, config.to_dict())
    if reads_train_data(config):  # (an online run without offline pairs reads none)
        log.info(f"{len(records)} pairs from {config.data.train_data}")
    if t.max_train_epochs:
        log.info(f"max_train_epochs = {t.max_train_epochs}: {t.max_train_steps} steps")
    check_before_model_load(config, records)
    adapter = get_model_adapter(config.model.family).load(
        config.model, device=accelerator.device, weight_dtype=WEIGHT_DTYPES[accelerator.mixed_precision])
    check_base_weights(adapter)
    reference = make_reference(config, adapter, log)  # before training: a frozen copy is the base
    params = adapter.add_trainable(config.network)
    stores = prepare_caches(config, adapter, records, accelerator, log)
    online = (OnlineSource.start(config, adapter, accelerator, log, resume_from, start)
              if config.online.enabled else None)  # the pool: refresh 0, or the checkpoint's
    # the adapter starts as an exact no-op (lora_up = 0), so calibration sees the reference
    sample = (run_calibration_sample(config, adapter, records, reference, stores)
              if t.skip_masked_timesteps else None)  # (deterministic: the same on resume)
    if online is not None and checkpoint is None and calibration_needed(config):
        sample = calibration_sample(adapter, online.calibration_batches(), t.seed, reference)
    objective = objective_for_run(config, adapter, records, checkpoint, log, reference, stores,
                                  sample)
    adapter.first_timestep = first_timestep_for_run(config, objective, adapter, sample, log)
    loss_scale = timestep_share(adapter.first_timestep,
                                adapter.noise_scheduler.config.num_train_timesteps)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(adapter.trainable_modules())
    if t.xformers:
        enable_xformers(adapter.trainable_modules(), accelerator.device, log.info)
    if t.full_bf16:
        cast_trainable_to_bf16(params)
    if t.compile:
        compile_trained_network(adapter, log.info)
    optimizer = build_optimizer(param_groups(params, adapter.trainable_modules()[0], t), t, log.info)
    optimizer_used = optimizer_name(optimizer)
    lr_scheduler = make_lr_scheduler(optimizer, t, accelerator.num_processes)
    if checkpoint is not None:
        if not checkpoint.get("shards"):  # a sharded (FSDP) one loads once sharded, below
            load_lora_state(adapter, checkpoint["lora"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        log.info(f"resumed from {resume_from} at step {start}")
    micro = t.gradient_accumulation_steps
    # every process takes every n-th micro-batch of one stream (accelerate's batch-sampler shards)
    stream = micro * accelerator.num_processes
    loader = (make_dataloader(config, records, total=t.max_train_steps * stream,
                              start=start * stream, stores=stores) if records else None)
    # several processes: the trained modules too (DDP / FSDP2 / DeepSpeed: training/distributed.py);
    # online batches are sharded by OnlineSource itself (pool and offline pairs alike)
    prepared = prepare_training(accelerator, adapter, optimizer,
                                loader if online is None else None, lr_scheduler)
    optimizer, lr_scheduler, params = prepared.optimizer, prepared.lr_scheduler, prepared.params
    loader = prepared.loader if online is None else online.batches(start, offline=loader)
    resume_sharded(checkpoint, resume_from, accelerator, adapter, optimizer)

    log.info(f"training {sum(p.numel() for p in params):,} {config.network.finetune} parameters with '{objective.name}' "
             f"for {t.max_train_steps} steps, {t.train_batch_size} pairs x {micro} accumulation")
    progress = tqdm(total=t.max_train_steps, initial=start, desc=objective.name, unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    step, micro_step = start, 0
    if online is not None:
        online.bar = progress
    so_far.update(adapter=adapter, objective=objective, accelerator=accelerator, steps=start,
                  start=start, num_pairs=len(records), started_at=started_at,
                  metrics_log=output_dir / "metrics.jsonl", optimizer=optimizer_used,
                  reference=live_reference(reference))
    evaluation = TrainingEvaluation(config, adapter, log, accelerator)
    evaluation.at_start(step)  # step-0 sample images and reward-curve point (the base model)
    watch = LossWatch()
    for batch in loader:
        draws = batch_draws(batch, t.seed, step, micro_step % micro)
        micro_step += 1
        metrics = train_step(batch, adapter, objective, accelerator, optimizer, lr_scheduler,
                             params, t.max_grad_norm, draws, reference, loss_scale)
        watch.add(metrics)
        log.accumulate(metrics)
        if not accelerator.sync_gradients:
            continue
        step += 1
        so_far["steps"] = step
        progress.update(1)
        if step % t.logging_steps == 0 or step == t.max_train_steps:
            logged = log.flush(step, lr=lr_scheduler.get_last_lr()[0])  # the host reads here
            watch.check(step, logged)
            progress.set_postfix(progress_fields(logged, prefix="train/"), refresh=False)
        if t.sample_every_n_steps and (step % t.sample_every_n_steps == 0
                                       or step == t.max_train_steps):
            if accelerator.is_main_process:
                with adapter.encoders_on_device():  # cached runs released the VAE / text encoders
                    save_samples(adapter, t, step)
        evaluation.after_step(step)
        if t.save_every_n_steps and (step % t.save_every_n_steps == 0 or step == t.max_train_steps):
            watch.check(step, {})  # never save weights a non-finite loss has reached
            if accelerator.is_main_process or parallelism(accelerator) == "fsdp":  # every shard
                save_training_state(config, step, adapter, objective, optimizer, lr_scheduler, run,
                                    write_extra=online.pool.save if online is not None else None,
                                    accelerator=accelerator)
    watch.check(step, log.last)
    gather_full_weights(accelerator, adapter)  # FSDP / DeepSpeed: onto the main process
    adapter.first_timestep = 0  # evaluation and analysis draw every timestep
    progress.close()
    log.close()
    adapter.restore_encoders()  # export and evaluation sample with the VAE / text encoders
    return TrainResult(adapter=adapter, objective=objective, accelerator=accelerator, steps=step,
                       num_pairs=len(records), started_at=started_at,
                       metrics_log=output_dir / "metrics.jsonl", last_metrics=log.last,
                       optimizer=optimizer_used, reference=live_reference(reference),
                       run_id=run.run_id)
