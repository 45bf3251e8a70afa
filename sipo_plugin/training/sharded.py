"""Sharded checkpoints (FSDP2): every process writes its own slice of the trained weights and of
the optimizer state; safetensors and JSON as in checkpoint.py, never a pickle.

    <output_dir>/checkpoints/step_0000004/
        trained-00000-of-00002.safetensors    process 0's slices of the trained tensors (the
                                              names of ``loop.lora_state``)
        optimizer-00000-of-00002.safetensors  process 0's optimizer state tensors, flattened as
                                              ``checkpoint.flatten_optimizer_state`` does
        trained-00001-of-00002.safetensors ...
        checkpoint.json                       checkpoint.py's JSON, plus "shards": 2

The processes build the folder under a temporary name they all know; once every process has
written its files (a barrier), the main process writes checkpoint.json and renames the folder into
place, so ``resume = "latest"`` never picks up a half-written one. No process gathers the full
weights or optimizer state (which need not fit on one device). Resuming needs the same number of
processes: each reads its own slices back into its sharded parameters and optimizer state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import (FORMAT, STATE_FILE, CheckpointError, checkpoint_path,
                         flatten_optimizer_state, unflatten_optimizer_state)


def shard_file(kind: str, rank: int, shards: int) -> str:
    """``trained-00000-of-00002.safetensors`` (kind: trained or optimizer)."""
    return f"{kind}-{rank:05d}-of-{shards:05d}.safetensors"


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's slice of a sharded (DTensor) tensor, or the tensor itself, on the CPU."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.detach().to("cpu").contiguous()


def local_optimizer_state(state_dict: dict) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor replaced by its local slice."""
    state = {index: {name: local_part(v) if isinstance(v, torch.Tensor) else v
                     for name, v in entries.items()}
             for index, entries in state_dict["state"].items()}
    return {"state": state, "param_groups": state_dict["param_groups"]}


def save_sharded_checkpoint(output_dir: str | Path, step: int, *, trained: dict[str, torch.Tensor],
                            optimizer_state: dict, info: dict, accelerator,
                            write_extra=None) -> Path:
    """Every process calls this with its own tensors (a collective: two barriers);
    ``write_extra(folder)`` (the online pool) writes into the folder on the main process, as in
    checkpoint.save_checkpoint."""
    path = checkpoint_path(output_dir, step)
    staging = path.with_name(f".{path.name}.shards.tmp")
    rank, shards = accelerator.process_index, accelerator.num_processes
    optimizer_tensors, optimizer_rest = flatten_optimizer_state(local_optimizer_state(optimizer_state))
    state = {"format": FORMAT, "step": step, **info, "optimizer": optimizer_rest, "shards": shards}
    text = json.dumps(state, indent=1, sort_keys=True)  # before any file: a bad value stops all
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # a killed save's leftovers
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file({k: local_part(v) for k, v in trained.items()},
              str(staging / shard_file("trained", rank, shards)))
    save_file(optimizer_tensors, str(staging / shard_file("optimizer", rank, shards)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if write_extra is not None:
            write_extra(staging)
        (staging / STATE_FILE).write_text(text + "\n", encoding="utf-8")  # last: it marks completion
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    accelerator.wait_for_everyone()
    return path


def load_shard(folder: str | Path, rank: int, shards: int) -> dict:
    """Process ``rank``'s part of a sharded checkpoint: {"lora": its trained slices,
    "optimizer": its optimizer state dict (local slices)}; refused with one line when the run's
    process count differs from the checkpoint's."""
    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("shards") != shards:
        raise CheckpointError(
            f"{folder}: a sharded (FSDP) checkpoint of {state.get('shards')} processes; resume it "
            f"with {state.get('shards')} processes and the same FSDP config (this run has "
            f"{shards})")
    try:
        trained = load_file(str(folder / shard_file("trained", rank, shards)))
        optimizer = unflatten_optimizer_state(
            load_file(str(folder / shard_file("optimizer", rank, shards))), state["optimizer"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"{folder}: not a readable sharded checkpoint "
                              f"({type(err).__name__}); delete it to resume from the previous "
                              "one") from None
    return {"lora": trained, "optimizer": optimizer}


def as_sharded_like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A local slice as the sharded tensor ``param`` is (its mesh and placements), or itself."""
    if not hasattr(param, "device_mesh"):
        return local.to(param.device)
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local.to(param.to_local().device), param.device_mesh,
                              param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def load_sharded_state(shard: dict, modules: list[torch.nn.Module], optimizer) -> None:
    """Copy a process's slices into its sharded trained parameters (names of ``loop.lora_state``)
    and optimizer state (every state tensor shaped as its parameter's slice becomes sharded as
    the parameter is; scalars such as Adam's step stay as they are)."""
    trained = trained_parameters(modules)
    if trained.keys() != shard["lora"].keys():
        raise CheckpointError("the checkpoint's trained weights do not match this run's network "
                              "settings (finetune, network_dim, targets, train_text_encoder)")
    with torch.no_grad():
        for name, p in trained.items():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.copy_(shard["lora"][name])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = shard["optimizer"]
    for index, entries in state["state"].items():
        param = params[int(index)]
        local_shape = (param.to_local() if hasattr(param, "to_local") else param).shape
        for name, value in entries.items():
            if isinstance(value, torch.Tensor) and value.shape == local_shape and value.dim() > 0:
                entries[name] = as_sharded_like(value, param)
    optimizer.load_state_dict(state)


def trained_parameters(modules: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The trained (possibly sharded) parameters by the names of ``loop.lora_state``."""
    return {f"{i}.{name}": p for i, module in enumerate(modules)
            for name, p in module.named_parameters() if p.requires_grad}
