"""Memory and speed options of a run: the optimizer (AdamW, 8-bit AdamW, Adafactor, Prodigy, Lion)
and its parameter groups, gradient checkpointing, attention kernels, bf16 weights and torch.compile.
An optional package or feature that is missing or unusable gives one line and a safe fallback:
8-bit AdamW -> torch AdamW, xformers -> PyTorch SDPA (diffusers' default), torch.compile -> the
uncompiled model."""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch


def param_groups(params: list[torch.nn.Parameter], denoiser: torch.nn.Module, training
                 ) -> list[dict]:
    """sd-scripts' separate learning rates: the U-Net / transformer's trained parameters at
    ``unet_lr``, the rest (the text-encoder LoRA) at ``text_encoder_lr`` (0: ``learning_rate``)."""
    t = training
    own = {id(p) for p in denoiser.parameters()}
    groups = [{"params": [p for p in params if id(p) in own], "lr": t.unet_lr or t.learning_rate},
              {"params": [p for p in params if id(p) not in own],
               "lr": t.text_encoder_lr or t.learning_rate}]
    return [group for group in groups if group["params"]]


def optimizer_kwargs(training) -> dict:
    """``optimizer_args`` ("name=value", values Python literals as sd-scripts reads them) over the
    adam_* settings; "betas=0.9,0.99" is a tuple."""
    from ..sdscripts.config_file import parse_key_values
    t = training
    if t.optimizer_type == "Adafactor":  # a fixed learning rate (the LR schedule drives it), as
        kwargs = {"relative_step": False, "scale_parameter": False, "warmup_init": False,
                  "weight_decay": t.adam_weight_decay}  # sd-scripts recommends for LoRA
    else:
        kwargs = {"betas": (t.adam_beta1, t.adam_beta2), "weight_decay": t.adam_weight_decay}
        if t.optimizer_type not in ("Lion", "Lion8bit"):  # Lion has no epsilon
            kwargs["eps"] = t.adam_epsilon
    return {**kwargs, **parse_key_values(t.optimizer_args, "optimizer_args", "optimizer_args")}


def build_optimizer(params: list, training, log: Callable[[str], None]) -> torch.optim.Optimizer:
    """The configured optimizer over ``params`` (tensors, or `param_groups`); an optional package
    that is missing gives one line: AdamW8bit falls back to AdamW, the optimizers whose learning
    rates differ from AdamW's (Prodigy, Lion) stop the run."""
    t = training
    cls = _optimizer_class(t.optimizer_type, log)
    try:
        return cls(params, lr=t.learning_rate, **optimizer_kwargs(t))
    except TypeError as err:
        raise ValueError(f"optimizer_args {t.optimizer_args}: {cls.__name__} refuses them ({err})") from None


def _optimizer_class(name: str, log: Callable[[str], None]) -> type:
    if name == "Adafactor":
        from transformers.optimization import Adafactor
        return Adafactor
    if name == "Prodigy":
        if importlib.util.find_spec("prodigyopt") is None:
            raise ValueError("optimizer_type = Prodigy needs prodigyopt (pip install prodigyopt)")
        from prodigyopt import Prodigy
        return Prodigy
    if name in ("AdamW8bit", "Lion", "Lion8bit"):
        bnb_optim = _bitsandbytes_optim(log, name)
        if bnb_optim is not None:
            return getattr(bnb_optim, name)
    return torch.optim.AdamW


def quiet_bitsandbytes(training) -> None:
    """diffusers imports bitsandbytes whenever it is installed, and on CPUs with AVX512-BF16 it
    warns about its optional ``kernels`` package: silenced unless the run uses 8-bit AdamW."""
    import logging
    if training.optimizer_type != "AdamW8bit":
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _bitsandbytes_optim(log: Callable[[str], None], name: str = "AdamW8bit"):
    missing = importlib.util.find_spec("bitsandbytes") is None
    if missing and name != "AdamW8bit":
        raise ValueError(f"optimizer_type = {name} needs bitsandbytes (pip install bitsandbytes)")
    if missing:
        log("optimizer_type = AdamW8bit needs bitsandbytes (pip install bitsandbytes): "
            "using torch AdamW (32-bit states)")
        return None
    try:
        import bitsandbytes.optim as bnb_optim
    except Exception as err:  # a broken install (no CUDA libraries, ...) must not stop the run
        if name != "AdamW8bit":
            raise ValueError(f"optimizer_type = {name}: bitsandbytes does not load "
                             f"({type(err).__name__}: {err})") from None
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


def compile_trained_network(adapter, log: Callable[[str], None]) -> None:
    """compile = true: ``torch.compile`` the denoiser in place (``nn.Module.compile``: its names,
    weights and LoRA switch stay as they are). Where torch.compile cannot run (no dynamo on this
    platform, or the backend fails on the first call, e.g. without a C++ compiler), one line says
    so and the step runs uncompiled."""
    if not torch._dynamo.is_dynamo_supported():
        log("compile = true: torch.compile is not supported on this platform; training uncompiled")
        return
    module = adapter.denoiser
    module.compile()
    compiled = module._compiled_call_impl

    def compiled_or_eager(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as err:  # the backend's many error types; a real model error recurs eagerly
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            log(f"compile = true: torch.compile failed here ({first}); training uncompiled")
            module._compiled_call_impl = None
            return module(*args, **kwargs)

    module._compiled_call_impl = compiled_or_eager
