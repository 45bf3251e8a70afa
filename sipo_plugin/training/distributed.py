"""Several processes through accelerate: DDP, FSDP2 or DeepSpeed, as the accelerate config says.

The trained modules (the U-Net / transformer, and the text encoders whose LoRA trains) go through
``accelerator.prepare`` with the optimizer, the data loader and the LR schedule:

- **DDP** (``accelerate launch --multi_gpu``, ``torchrun``): each module is wrapped in
  DistributedDataParallel, whose hooks average the gradients bucket by bucket while the backward
  pass still runs; accumulation steps run under ``no_sync`` (``accelerator.accumulate``). The model
  adapter keeps calling its own (unwrapped) modules: ``route_through`` sends a call made with grad
  enabled (the policy's forward) through the wrapper, and lets a call without grad (the reference
  with the adapter off, calibration, sample images) run the module alone, as diffusers'
  train_diffusion_dpo.py does.
- **FSDP2** (``fsdp_version: 2``): accelerate shards every weight, gradient and optimizer state
  across the processes (``fully_shard`` per block); the module stays the adapter's own object, so
  every forward (policy and reference) all-gathers its blocks on every process. Checkpoints are
  sharded (one file per process, training/sharded.py); after training the full weights are gathered
  on the main process for the export (``gather_full_weights``).
- **DeepSpeed** (ZeRO-2/3 configs in configs/): the module becomes the DeepSpeed engine, called as
  the DDP wrapper is.

One process: nothing is wrapped (the modules, the optimizer and the loop run as they are).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

FSDP_ON_CPU = "sipo-plugin: FSDP on CPU processes"


class DistributedSetupError(ValueError):
    """An accelerate configuration this trainer cannot run; the message says what to change."""


def make_accelerator(training, *, cpu: bool, project_dir: str) -> Accelerator:
    """The run's Accelerator (its DDP settings are completed by ``prepare_training``)."""
    accelerator = Accelerator(
        mixed_precision=training.mixed_precision, cpu=cpu,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        log_with=None if training.log_with == "none" else training.log_with,
        project_dir=project_dir, kwargs_handlers=[DistributedDataParallelKwargs()])
    if accelerator.distributed_type == DistributedType.MULTI_CPU and fsdp_requested():
        use_fsdp_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        check_fsdp_plugin(accelerator.state.fsdp_plugin)
    return accelerator


def fsdp_requested() -> bool:
    """``accelerate launch --use_fsdp`` or an FSDP config file sets ACCELERATE_USE_FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def use_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """accelerate enables FSDP on accelerators only; asked for with CPU processes (gloo: the
    tests, a laptop), it is switched on here with the plugin the launch's FSDP_* variables
    describe: torch's FSDP2 runs on CPU tensors, accelerate's preparation is the same."""
    from accelerate import FullyShardedDataParallelPlugin
    state = accelerator.state
    plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    accelerator.__dict__[FSDP_ON_CPU] = True


def check_fsdp_plugin(plugin) -> None:
    """FSDP2 only: FSDP1's flat parameters cannot switch the LoRA's requires_grad on and off
    (the adapter-off reference), nor hold frozen and trained weights in one flat tensor."""
    if plugin.fsdp_version != 2:
        raise DistributedSetupError(
            "FSDP: the accelerate config asks for fsdp_version 1; this trainer uses FSDP2: set "
            "fsdp_version: 2 in the accelerate config (or --fsdp_version 2; configs/fsdp2.yaml)")


def parallelism(accelerator: Accelerator) -> str:
    """'none' (one process), 'ddp', 'fsdp' or 'deepspeed'."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "none"


@dataclass
class PreparedTraining:
    """What ``accelerator.prepare`` returned: the modules as wrapped (what ``accumulate`` syncs),
    the optimizer, loader and schedule, and the trained parameters as they are now (FSDP2
    replaced them by sharded DTensors)."""

    modules: list[torch.nn.Module]
    optimizer: object
    loader: object
    lr_scheduler: object
    params: list[torch.nn.Parameter]


def prepare_training(accelerator: Accelerator, adapter, optimizer, loader, lr_scheduler
                     ) -> PreparedTraining:
    """Prepare the run's objects; with several processes the trained modules too (DDP / FSDP2 /
    DeepSpeed). The adapter keeps its modules (FSDP2 shards them in place; DDP and DeepSpeed
    wrappers are reached through ``route_through``); ``adapter.prepared_modules`` holds what
    ``accelerator.accumulate`` needs."""
    modules = adapter.trainable_modules()
    # DDP looks for unused parameters only when a text encoder trains (its last layer's LoRA gets
    # no gradient with clip_skip 2 or SDXL's penultimate states); elsewhere every trained weight
    # is used, and the search would cost a graph walk per step
    accelerator.ddp_handler.find_unused_parameters = adapter.trains_text_encoder
    if accelerator.num_processes == 1:
        optimizer, loader, lr_scheduler = accelerator.prepare(optimizer, loader, lr_scheduler)
        wrapped = list(modules)
    else:
        *wrapped, optimizer, loader, lr_scheduler = accelerator.prepare(
            *modules, optimizer, loader, lr_scheduler)
        for module, wrapper in zip(modules, wrapped, strict=True):
            if wrapper is not module:
                route_through(wrapper, module)
    adapter.prepared_modules = wrapped
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return PreparedTraining(wrapped, optimizer, loader, lr_scheduler, params)


def sync_modules(adapter) -> list[torch.nn.Module]:
    """The modules ``accelerator.accumulate`` takes: the prepared wrappers (their ``no_sync``
    skips the gradient all-reduce of accumulation steps), or the adapter's own modules."""
    return getattr(adapter, "prepared_modules", None) or adapter.trainable_modules()


def route_through(wrapper: torch.nn.Module, module: torch.nn.Module) -> None:
    """Calls of ``module`` made with grad enabled run through ``wrapper`` (DDP's forward prepares
    the gradient all-reduce of the coming backward pass); calls without grad, and the wrapper's own
    call back into the module, run the module alone. The adapter keeps holding ``module``, so its
    attributes (config, dtype, submodules) and export are untouched."""
    inner_forward = module.forward
    inside = [False]

    def forward(*args, **kwargs):
        if inside[0] or not torch.is_grad_enabled():
            return inner_forward(*args, **kwargs)
        inside[0] = True
        try:
            return wrapper(*args, **kwargs)
        finally:
            inside[0] = False

    module.forward = forward
