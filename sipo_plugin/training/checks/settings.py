"""Rules across the settings of one run that need neither files nor devices: ranges, choices,
reference and caches, the LoRA's layers, buckets, [sampling] / [pairs] / [evaluate] and the
objective's hyper-parameters. Each rule raises ConfigError naming every problem it finds.
"""

from __future__ import annotations

from ...data.buckets import BucketSpec
from ...evaluation.checks import check_pairs_and_evaluation
from ...models.families import FAMILIES
from ...objectives.catalog import check_objective
from ..config_parsing import closest
from ..config_schema import (OPTIMIZER_TYPES, REFERENCE_MODES, SAVE_PRECISIONS, SEED_MAX, TRACKERS,
                             Config, ConfigError)
from ..online_config import online_problems
from .files import network_weights_problem, reference_device_problem


def _is_plain_name(name: str) -> bool:
    """A file name that stays inside its folder: not empty, no separators, not '.' or '..'."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _range_problems(values: dict[str, tuple[float, str]]) -> list[str]:
    """``{key: (value, rule)}`` with rule ``> 0``, ``>= 0``, ``>= 1``, ``[0, 1)`` or ``seed``: one
    problem per value outside its range."""
    inside = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1,
              "[0, 1)": lambda v: 0 <= v < 1, "seed": lambda v: 0 <= v <= SEED_MAX}
    shown = {"seed": f"in [0, {SEED_MAX}]"}
    return [f"'{key}' must be {shown.get(rule, rule)}, got {value}"
            for key, (value, rule) in values.items() if not inside[rule](value)]


def ranges(config: Config) -> None:
    """Every numeric setting within its range, before anything loads."""
    t, d, n = config.training, config.data, config.network
    values = {
        "max_train_steps": (t.max_train_steps, "> 0"), "train_batch_size": (t.train_batch_size, "> 0"),
        "gradient_accumulation_steps": (t.gradient_accumulation_steps, "> 0"),
        "resolution": (d.resolution, "> 0"), "network_dim": (n.network_dim, "> 0"),
        "network_alpha": (n.network_alpha, "> 0"), "learning_rate": (t.learning_rate, "> 0"),
        "logging_steps": (t.logging_steps, "> 0"), "calibration_pairs": (t.calibration_pairs, "> 0"),
        "save_last_n": (t.save_last_n, "> 0"), "save_every_n_steps": (t.save_every_n_steps, ">= 0"),
        "lr_warmup_steps": (t.lr_warmup_steps, ">= 0"), "max_grad_norm": (t.max_grad_norm, ">= 0"),
        "adam_beta1": (t.adam_beta1, "[0, 1)"), "adam_beta2": (t.adam_beta2, "[0, 1)"),
        "adam_epsilon": (t.adam_epsilon, "> 0"), "adam_weight_decay": (t.adam_weight_decay, ">= 0"),
        "seed": (t.seed, "seed"), "sample_seed": (t.sample_seed, "seed"),
        "sample_steps": (t.sample_steps, ">= 1"),
        "sample_every_n_steps": (t.sample_every_n_steps, ">= 0"),
        "sample_guidance_scale": (t.sample_guidance_scale, ">= 0"),
        "dataloader_num_workers": (d.dataloader_num_workers, ">= 0"),
        "unet_lr": (t.unet_lr, ">= 0"), "text_encoder_lr": (t.text_encoder_lr, ">= 0"),
        "max_train_epochs": (t.max_train_epochs, ">= 0"),
    }
    problems = _range_problems(values)
    if not _is_plain_name(t.output_name):
        problems.append(f"'output_name' must be a plain file name (no folders, no '..'), got "
                        f"{t.output_name!r}; put the folder in output_dir")
    if t.full_bf16 and t.mixed_precision != "bf16":
        problems.append("full_bf16 = true needs mixed_precision = \"bf16\"")
    if t.sample_every_n_steps and not t.sample_prompts:
        problems.append("sample_every_n_steps needs sample_prompts")
    if problems:
        raise ConfigError([f"{config.source}: {p}" for p in problems])


def choices(config: Config) -> None:
    t, m = config.training, config.model
    allowed_values = {"mixed_precision": (t.mixed_precision, ("no", "fp16", "bf16")),
               "optimizer_type": (t.optimizer_type, OPTIMIZER_TYPES),
               "log_with": (t.log_with, TRACKERS),
               "lr_scheduler": (t.lr_scheduler, ("constant", "constant_with_warmup", "linear",
                                                  "cosine", "cosine_with_restarts", "polynomial"))}
    if m.family in FAMILIES:
        allowed_values["lora_format"] = (config.export.lora_format, FAMILIES[m.family].lora_formats)
    problems = [f"{config.source}: '{key}' must be one of {', '.join(allowed)}, got '{value}'"
                f"{closest(value, allowed)}"
                for key, (value, allowed) in allowed_values.items() if value not in allowed]
    if problems:
        raise ConfigError(problems)


def _raise_first(where: str, rules: list[tuple[object, str]]) -> None:
    """ConfigError ``where: message`` for the first ``(broken, message)`` rule that is broken
    (one line, the first problem in the rules' order)."""
    for broken, message in rules:
        if broken:
            raise ConfigError(f"{where}: {message}")


def _raise_problem(where: str, problem: str | None) -> None:
    """ConfigError ``where: problem`` when a ``*_problem`` check found one."""
    if problem:
        raise ConfigError(f"{where}: {problem}")


def reference_and_caches(config: Config) -> None:
    """Cross-checks of finetune, reference and caching (one line each, naming the fix)."""
    where, t, d, n = config.source, config.training, config.data, config.network
    choices = {"finetune": (n.finetune, ("lora", "full")),
               "reference": (t.reference, REFERENCE_MODES),
               "reference_dtype": (t.reference_dtype, ("", "fp16", "bf16", "fp32"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{where}: '{key}' must be one of {', '.join(map(repr, allowed))}, "
                              f"got '{value}'{closest(value, allowed)}")
    caches_latents = d.cache_latents or d.cache_latents_to_disk
    cached = t.reference == "cached"
    _raise_first(where, [
        (t.reference_cache_draws <= 0,
         f"'reference_cache_draws' must be > 0, got {t.reference_cache_draws}"),
        (n.finetune == "full" and n.train_text_encoder,
         "finetune = \"full\" trains the U-Net only; set train_text_encoder = false"),
        (d.cache_text_encoder_outputs and n.train_text_encoder,
         "cache_text_encoder_outputs needs a frozen text encoder; set train_text_encoder = false "
         "or cache_text_encoder_outputs = false"),
        (caches_latents and d.flip_aug,
         "flip_aug cannot be used with cache_latents (the cache holds one orientation); set "
         "flip_aug = false or cache_latents = false"),
        (cached and not caches_latents,
         "reference = \"cached\" needs cache_latents = true (the cached errors are for fixed "
         "latents)"),
        (cached and d.caption_dropout_rate > 0,
         "reference = \"cached\" cannot be used with caption_dropout_rate > 0 (the cached errors "
         "are for the full caption); set caption_dropout_rate = 0"),
    ])
    _skip_masked_timesteps(config)
    copies = t.reference == "frozen_copy" or (t.reference in ("auto", "base") and n.finetune == "full")
    _raise_first(where, [
        ((t.reference_device or t.reference_dtype) and not copies,
         "reference_device / reference_dtype apply to a frozen copy only; set reference = "
         "\"frozen_copy\" or leave them empty"),
    ])
    _raise_problem(where, reference_device_problem(t.reference_device))


def _skip_masked_timesteps(config: Config) -> None:
    """skip_masked_timesteps needs a mask that depends on the timestep (a step-wise weight) and
    fresh draws (a cached reference fixes each pair's timesteps before calibration)."""
    where, t = config.source, config.training
    if not t.skip_masked_timesteps:
        return
    try:
        hyper = check_objective(config.objective.name, config.objective.hyperparameters)
    except (KeyError, ValueError, TypeError):
        return  # reported by the objective's own validation
    _raise_first(where, [
        (getattr(hyper, "weight_model", None) != "step" or not getattr(hyper, "mask_threshold", 0),
         "skip_masked_timesteps needs an objective that masks pairs by timestep (dpo-cm or sipo "
         "with weight_model = \"step\" and mask_threshold > 0); set skip_masked_timesteps = false"),
        (t.reference == "cached",
         "skip_masked_timesteps cannot be used with reference = \"cached\" (its draws are fixed "
         "before calibration); set one of them off"),
    ])


def network_start_and_layers(config: Config) -> None:
    """network_weights, reference = "initial", LoCon, DoRA, clip_skip, save_precision (one line
    each, naming the fix)."""
    where, t, n = config.source, config.training, config.network
    precision = config.export.save_precision
    _raise_first(where, [
        (precision not in SAVE_PRECISIONS,
         f"'save_precision' must be one of {', '.join(SAVE_PRECISIONS)}, got '{precision}'"
         f"{closest(precision, SAVE_PRECISIONS)}"),
        (config.model.clip_skip < 0 or n.conv_dim < 0, "'clip_skip' and 'conv_dim' must be >= 0"),
        (n.conv_alpha <= 0, f"'conv_alpha' must be > 0, got {n.conv_alpha}"),
        (n.finetune == "full" and (n.network_weights or n.conv_dim or n.use_dora),
         "network_weights, conv_dim and use_dora are LoRA settings; finetune = \"full\" trains "
         "every U-Net weight (set finetune = \"lora\")"),
        (t.reference == "initial" and not n.network_weights,
         "reference = \"initial\" is the LoRA of network_weights, frozen; set network_weights to "
         "a LoRA file, or reference = \"base\""),
    ])
    _raise_problem(where, network_weights_problem(n.network_weights))


def buckets_and_augmentation(config: Config) -> None:
    """[data] bucket settings (when enable_bucket) and caption_dropout_rate in [0, 1]."""
    d = config.data
    if not 0.0 <= d.caption_dropout_rate <= 1.0:
        raise ConfigError(f"{config.source}: 'caption_dropout_rate' must be in [0, 1], "
                          f"got {d.caption_dropout_rate}")
    problem = BucketSpec(d.resolution, d.min_bucket_reso, d.max_bucket_reso,
                         d.bucket_reso_steps).problem() if d.enable_bucket else None
    if problem:
        raise ConfigError(f"{config.source}: {problem} (or set enable_bucket = false)")


def sampling(config: Config) -> None:
    """[sampling], [pairs], [evaluate]: ranges, strategies, reward names."""
    try:
        check_pairs_and_evaluation(config)
    except ValueError as err:
        raise ConfigError(f"{config.source}: {err}") from None


def objective(config: Config) -> None:
    """The objective validates its own hyper-parameters (unknown names, ranges)."""
    try:
        check_objective(config.objective.name, config.objective.hyperparameters)
    except (KeyError, ValueError, TypeError) as err:
        message = err.args[0] if err.args else str(err)
        raise ConfigError(f"{config.source}: [objective] {message}") from None


def online(config: Config) -> None:
    """[online]: training on pairs refreshed from the policy (training/online_config.py)."""
    problems = online_problems(config)
    if problems:
        raise ConfigError([f"{config.source}: {p}" for p in problems])
