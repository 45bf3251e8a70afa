"""Memory options of a run: the optimizer (AdamW, 8-bit AdamW, Adafactor), gradient checkpointing,
attention kernels and bf16 weights. An optional package that is missing or unusable gives one line
and a safe fallback: 8-bit AdamW -> torch AdamW, xformers -> PyTorch SDPA (diffusers' default)."""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch


def build_optimizer(params: list[torch.nn.Parameter], training, log: Callable[[str], None]
                    ) -> torch.optim.Optimizer:
    """The configured optimizer over ``params`` (``training``: the [training] config)."""
    t = training
    if t.optimizer_type == "AdamW8bit":
        bnb_optim = _bitsandbytes_optim(log)
        if bnb_optim is not None:
            return bnb_optim.AdamW8bit(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                       weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    if t.optimizer_type == "Adafactor":
        from transformers.optimization import Adafactor
        # a fixed learning rate (the LR schedule drives it), as sd-scripts recommends for LoRA
        return Adafactor(params, lr=t.learning_rate, relative_step=False, scale_parameter=False,
                         warmup_init=False, weight_decay=t.adam_weight_decay)
    return torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                             weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)


def _bitsandbytes_optim(log: Callable[[str], None]):
    if importlib.util.find_spec("bitsandbytes") is None:
        log("optimizer_type = AdamW8bit needs bitsandbytes (pip install bitsandbytes): "
            "using torch AdamW (32-bit states)")
        return None
    try:
        import bitsandbytes.optim as bnb_optim
    except Exception as err:  # a broken install (no CUDA libraries, ...) must not stop the run
        log(f"bitsandbytes does not load ({type(err).__name__}: {err}): using torch AdamW")
        return None
    return bnb_optim


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """``module.Class`` as sd-scripts writes ``ss_optimizer``."""
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__name__}"


def enable_gradient_checkpointing(modules: list[torch.nn.Module]) -> int:
    """Turn on activation checkpointing in diffusers and transformers models; returns how many."""
    count = 0
    for module in modules:
        if hasattr(module, "enable_gradient_checkpointing"):  # diffusers ModelMixin
            module.enable_gradient_checkpointing()
        elif hasattr(module, "gradient_checkpointing_enable"):  # transformers PreTrainedModel
            # non-reentrant: a LoRA on a frozen model has inputs without grad
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            continue
        count += 1
    return count


def enable_xformers(modules: list[torch.nn.Module], device: torch.device,
                    log: Callable[[str], None]) -> bool:
    """xformers attention where it can run (CUDA, installed); PyTorch SDPA otherwise."""
    if device.type != "cuda":
        log("xformers has no CPU kernels: using PyTorch SDPA attention")
        return False
    if importlib.util.find_spec("xformers") is None:
        log("xformers is not installed (pip install xformers): using PyTorch SDPA attention")
        return False
    for module in modules:
        if hasattr(module, "enable_xformers_memory_efficient_attention"):
            module.enable_xformers_memory_efficient_attention()
    return True


def cast_trainable_to_bf16(params: list[torch.nn.Parameter]) -> None:
    """full_bf16: the trained weights themselves in bf16 (half the weight, gradient and optimizer
    memory of fp32; updates lose precision, which sd-scripts accepts for SDXL on 24 GB)."""
    for p in params:
        p.data = p.data.to(torch.bfloat16)
