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
from accelerate.state import PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType


class DistributedSetupError(ValueError):
    """An accelerate configuration this trainer cannot run; the message says what to change."""


def make_accelerator(config, *, cpu: bool, project_dir: str) -> Accelerator:
    """The run's Accelerator (its DDP settings are completed by ``prepare_training``); an
    FSDP or DeepSpeed setting this trainer cannot run is refused here, before anything loads."""
    training = config.training
    shared = PartialState._shared_state  # an earlier FSDP-on-CPU run of this process set FSDP
    if cpu and shared.get("distributed_type") == DistributedType.FSDP:
        shared["distributed_type"] = DistributedType.MULTI_CPU
    if deepspeed_requested():
        cpu = False  # accelerate ignores DeepSpeed in CPU mode
    accelerator = Accelerator(
        mixed_precision=training.mixed_precision, cpu=cpu,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        log_with=None if training.log_with == "none" else training.log_with,
        project_dir=project_dir, kwargs_handlers=[DistributedDataParallelKwargs()])
    if accelerator.distributed_type == DistributedType.MULTI_CPU and fsdp_requested():
        use_fsdp_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        check_fsdp_plugin(accelerator.state.fsdp_plugin)
        check_fsdp_run(config)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator.state.deepspeed_plugin, config)
    return accelerator


def deepspeed_requested() -> bool:
    """``accelerate launch`` with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def configure_deepspeed(plugin, config) -> None:
    """The DeepSpeed config's "auto" values from the preset: the micro-batch (our loader has a
    batch sampler, from which accelerate cannot read it) and the clipping norm. DeepSpeed trains
    one module per engine: a text-encoder LoRA is refused."""
    t = config.training
    if config.network.train_text_encoder:
        raise DistributedSetupError(
            "DeepSpeed trains one module per engine: set train_text_encoder = false, or use DDP "
            "or FSDP (configs/ddp.yaml, configs/fsdp2.yaml)")
    ds = plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = t.train_batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = t.max_grad_norm


def fsdp_requested() -> bool:
    """``accelerate launch --use_fsdp`` or an FSDP config file sets ACCELERATE_USE_FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def use_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """accelerate enables FSDP on accelerators only; asked for with CPU processes (gloo: the
    tests, a laptop), it is switched on here with the plugin the launch's FSDP_* variables
    describe: torch's FSDP2 runs on CPU tensors, accelerate's preparation is the same."""
    from accelerate import FullyShardedDataParallelPlugin
    state = accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    # every AcceleratorState() copies PartialState's type: both say FSDP (make_accelerator
    # switches PartialState back for the next run of the process)
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


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
    if parallelism(accelerator) in ("fsdp", "deepspeed"):  # sharded: gathered after training
        adapter.unsharded_skeletons = dict(zip(attribute_names(adapter, modules),
                                               map(meta_skeleton, modules)))
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


# -- FSDP2: what every process must do together, and the full weights after training --

def check_fsdp_run(config) -> None:
    """Under FSDP every forward of the sharded model is a collective: what only the main process
    runs mid-training (sample images, the reward curve) cannot use it."""
    t, e = config.training, config.evaluate
    if t.sample_every_n_steps or e.evaluate_every_n_steps:
        raise DistributedSetupError(
            "FSDP: sample_every_n_steps and evaluate_every_n_steps need the whole model on the "
            "main process during training; set them to 0 (the export and eval_after_training "
            "still run on the gathered weights after training)")


def meta_skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose parameters are on the meta device (no memory): the unsharded
    module the gathered weights are loaded into after training (buffers are copied as they are)."""
    import copy
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                      requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def gather_full_weights(accelerator: Accelerator, adapter) -> None:
    """FSDP2 / DeepSpeed: every process takes part in gathering each prepared module's full
    weights onto the main process (``accelerator.get_state_dict``: on its CPU); there they are
    loaded into the unsharded copy made before sharding, which replaces the sharded module in the
    adapter, so export and evaluation run as with one process. The other processes write nothing."""
    skeletons = getattr(adapter, "unsharded_skeletons", None)
    if not skeletons:
        return
    for (name, skeleton), prepared in zip(skeletons.items(), adapter.prepared_modules, strict=True):
        full = accelerator.get_state_dict(prepared)
        if accelerator.is_main_process:
            skeleton.load_state_dict(full, assign=True)
            setattr(adapter, name, skeleton.to(accelerator.device))
    adapter.unsharded_skeletons = None
    adapter.prepared_modules = None
    accelerator.wait_for_everyone()


def attribute_names(adapter, modules: list[torch.nn.Module]) -> list[str]:
    """The adapter attribute holding each module (``unet``, ``text_encoder``, ...)."""
    names = {id(value): name for name, value in vars(adapter).items()
             if isinstance(value, torch.nn.Module)}
    return [names[id(m)] for m in modules]


def resume_sharded(checkpoint: dict | None, folder, accelerator: Accelerator, adapter, optimizer
                   ) -> None:
    """A sharded (FSDP) checkpoint loads once the run is sharded the same way: each process reads
    its own slices. An FSDP run and a checkpoint of another kind do not mix (one line says so)."""
    if checkpoint is None:
        return
    sharded_run = parallelism(accelerator) == "fsdp"
    if bool(checkpoint.get("shards")) != sharded_run:
        from .checkpoint import CheckpointError
        kind = "a sharded (FSDP)" if checkpoint.get("shards") else "an unsharded"
        raise CheckpointError(f"{folder}: {kind} checkpoint; resume it with the kind of run that "
                              f"wrote it (this run: {parallelism(accelerator)}), or start anew")
    if sharded_run:
        from .sharded import load_shard, load_sharded_state
        shard = load_shard(folder, accelerator.process_index, accelerator.num_processes)
        load_sharded_state(shard, adapter.trainable_modules(), optimizer)
