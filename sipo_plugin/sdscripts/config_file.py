"""sd-scripts' training config file (``--config_file F.toml``) and option names -> our settings.

Read as sd-scripts' ``read_config_from_file`` reads it: every top-level table is cosmetic and its
keys are merged into one flat namespace (a later table's key wins), top-level keys are kept as
they are; command-line options then win over the file. `translate` maps each sd-scripts key onto
this project's settings (same name, a rename, or a value conversion); keys with no meaning here
are collected for the one "not used here" line, except when their value asks for nothing
(false, 0, empty, or sd-scripts' own default).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class SdScriptsError(ValueError):
    """A one-line, user-facing error about an sd-scripts config file or option."""


# sd-scripts' own defaults for the settings where they differ from this project's: a run from an
# sd-scripts config trains what sd-scripts would train with the same file
SD_SCRIPTS_DEFAULTS = {
    "network_dim": 4,  # networks/lora.py: network_dim None -> 4
    "network_alpha": 1.0,
    "learning_rate": 2e-6,
    "max_train_steps": 1600,
    "train_text_encoder": True,  # unless network_train_unet_only
    # networks.lora wraps every Linear and 1x1 Conv2d inside the U-Net's Transformer2DModel blocks
    "network_target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                               "ff.net.0.proj", "ff.net.2"],
}

# settings of this project that also take sd-scripts' spelling of their value (resolution "512,512",
# optimizer_type "adamw8bit", sample_prompts "prompts.txt", optimizer_args as one string)
SD_SCRIPTS_VALUES = frozenset({"resolution", "optimizer_type", "sample_prompts", "optimizer_args"})

RENAMED = {"max_data_loader_n_workers": "dataloader_num_workers", "train_data_dir": "train_data",
           "dataset_config": "train_data", "torch_compile": "compile"}

# sd-scripts values that ask for nothing beyond what this project does anyway
NEUTRAL_VALUES = {
    "max_token_length": 75, "prior_loss_weight": 1.0, "max_timestep": 1000, "huber_c": 0.1,
    "huber_schedule": "snr", "loss_type": "l2", "multires_noise_discount": 0.3,
    "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1.0, "dynamo_backend": "no",
    "save_model_as": "safetensors", "caption_separator": ",", "vae_batch_size": 1,
    "noise_offset_type": "Original", "network_module": "networks.lora", "clip_skip": 1,
    "save_precision": "float", "persistent_data_loader_workers": True, "sdpa": True,
    "dim_from_weights": True, "network_multiplier": 1.0, "caption_dropout_every_n_epochs": 0,
}

# option names of sd-scripts' train_network.py (and the kohya_ss GUI's config files) that have no
# setting here: accepted on the command line and reported in the "not used here" line
KNOWN_UNUSED = frozenset("""
adaptive_noise_scale async_upload bucket_no_upscale cache_info caption_dropout_every_n_epochs
caption_prefix caption_separator caption_suffix caption_tag_dropout_rate class_tokens color_aug
debiased_estimation_loss debug_dataset dynamo_backend epoch face_crop_aug_range fp8_base full_fp16
highvram huber_c huber_schedule huggingface_path_in_repo huggingface_repo_id huggingface_repo_type
huggingface_repo_visibility huggingface_token in_json ip_noise_gamma ip_noise_gamma_random_strength
keep_tokens keep_tokens_separator log_config log_prefix log_tracker_config log_tracker_name
logging_dir loraplus_lr_ratio loraplus_text_encoder_lr_ratio loraplus_unet_lr_ratio loss_type
lowram lowvram lr_scheduler_args lr_scheduler_num_cycles lr_scheduler_power lr_scheduler_type
masked_loss max_timestep max_token_length mem_eff_attn metadata_author metadata_description
metadata_license metadata_tags metadata_title min_snr_gamma min_timestep multires_noise_discount
multires_noise_iterations network_dropout no_half_vae no_metadata noise_offset
noise_offset_random_strength noise_offset_type persistent_data_loader_workers prior_loss_weight
random_crop reg_data_dir resume_from_huggingface sample_at_first sample_every_n_epochs
sample_sampler save_every_n_epochs save_last_n_epochs save_last_n_epochs_state save_last_n_steps
save_last_n_steps_state save_state save_state_on_train_end save_state_to_huggingface
scale_v_pred_loss_like_noise_pred scale_weight_norms shuffle_caption stop_text_encoder_training
token_warmup_min token_warmup_step training_comment v2 v_parameterization v_pred_like_loss vae
vae_batch_size wandb_api_key wandb_run_name weighted_captions zero_terminal_snr
""".split())


def flatten_config(raw: dict) -> dict:
    """sd-scripts' flattening: {table: {k: v}} -> {k: v}; top-level keys stay. This project's own
    ``[objective] name`` (its output_config) becomes ``objective``, the one name a flat file needs;
    a run.toml's ``[run]`` table (the run's id, not a setting) is left out."""
    flat: dict = {}
    for name, value in raw.items():
        if name == "run" and isinstance(value, dict):  # a run.toml's id and start time
            continue
        if not isinstance(value, dict):
            flat[name] = value
            continue
        for key, inner in value.items():
            flat["objective" if (name, key) == ("objective", "name") else key] = inner
    return flat


def read_toml(path: Path, what: str) -> dict:
    """A TOML file's contents; SdScriptsError naming the file when it is missing or malformed."""
    if not path.is_file():
        raise SdScriptsError(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise SdScriptsError(f"{path}: not valid TOML: {err}") from None


def read_config_file(path: str | Path) -> dict:
    """The flat key -> value dict of an sd-scripts config file (sd-scripts appends a missing
    ``.toml`` to the name: so does this)."""
    path = Path(path)
    if path.suffix != ".toml" and not path.is_file():
        path = path.with_name(path.name + ".toml")
    return flatten_config(read_toml(path, "config_file"))


def is_neutral(key: str, value: Any) -> bool:
    """True when an sd-scripts value asks for nothing: false / 0 / empty / None, or its default."""
    if value is None or value is False or value == "" or value == [] or value == {}:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return True
    return key in NEUTRAL_VALUES and value == NEUTRAL_VALUES[key]


def parse_resolution(value: Any, where: str) -> int:
    """sd-scripts' resolution (512, "512", "512,512", [512, 512]) -> one side; square only."""
    parts = value if isinstance(value, list) else str(value).replace(" ", "").split(",")
    try:
        sides = [int(p) for p in parts if not isinstance(p, bool)]
    except (TypeError, ValueError):
        sides = []
    if not sides or len(sides) != len(parts) or len(sides) > 2:
        raise SdScriptsError(f"{where}: 'resolution' must be a number or \"W,H\", got {value!r}")
    if len(set(sides)) != 1:
        raise SdScriptsError(f"{where}: 'resolution' = {value!r}: training sizes are square here "
                             "(with enable_bucket, resolution^2 is the bucket area); give one side")
    return sides[0]


def parse_key_values(items: Any, key: str, where: str) -> dict[str, Any]:
    """sd-scripts' ``["k=v", ...]`` lists (network_args, optimizer_args): values read as Python
    literals (``betas=0.9,0.99`` -> a tuple, ``decouple=True``), else kept as text."""
    if isinstance(items, str):
        items = items.split()
    if not isinstance(items, list) or not all(isinstance(i, str) and "=" in i for i in items):
        raise SdScriptsError(f"{where}: '{key}' must be a list of \"name=value\" strings, got {items!r}")
    out = {}
    for item in items:
        name, text = (s.strip() for s in item.split("=", 1))
        try:
            out[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[name] = text
    return out


def read_sample_prompts(value: Any, where: str) -> list[str]:
    """sd-scripts' sample_prompts file (.txt: one prompt a line, ``#`` comments, options after
    `` --``) -> the prompts; a list is taken as it is."""
    if isinstance(value, list):
        return value
    path = Path(str(value))
    if path.suffix.lower() != ".txt" or not path.is_file():
        raise SdScriptsError(f"{where}: 'sample_prompts' = {value!r}: give a list of prompts or an "
                             "existing .txt file with one prompt a line")
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        prompt = line.split(" --", 1)[0].strip()
        if prompt and not prompt.startswith("#"):
            prompts.append(prompt)
    return prompts


def _network_module(value, where, fields):
    if value != "networks.lora":
        raise SdScriptsError(f"{where}: network_module = {value!r} is not trained here; only "
                             "networks.lora (LoRA; LoCon through network_args conv_dim/conv_alpha)")
    return {}, []


def _network_args(value, where, fields):
    args, out, unused = parse_key_values(value, "network_args", where), {}, []
    for name, arg in args.items():
        if name in ("conv_dim", "conv_alpha") and name in fields:
            out[name] = arg
        elif not is_neutral(name, arg):
            unused.append(f"network_args {name}")
    return out, unused


def _optimizer_args(value, where, fields):
    parse_key_values(value, "optimizer_args", where)  # the format is checked here, the names
    return {"optimizer_args": value.split() if isinstance(value, str) else value}, []  # by the optimizer


def _learning_rate_of(part: str, setting: str):
    def handle(value, where, fields):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
            if part == "unet":
                raise SdScriptsError(f"{where}: unet_lr = 0 trains no U-Net LoRA; preference "
                                     "training needs it (remove unet_lr or set it > 0)")
            return {"train_text_encoder": False}, []  # sd-scripts skips a part whose LR is 0
        return {setting: value}, []
    return handle


def _refused(message: str):
    def handle(value, where, fields):
        if value:
            raise SdScriptsError(f"{where}: {message}")
        return {}, []
    return handle


def _only_if_field(key: str):
    """Settings of the LoRA-refinement / LoCon / DoRA / clip_skip / save_precision work, mapped
    before the config may have them: passed on when it has the field, else listed as not used."""
    def handle(value, where, fields):
        if key in fields:
            return {key: value}, []
        return {}, ([] if is_neutral(key, value) else [key])
    return handle


def _optimizer_type(value, where, fields, choices: Iterable[str] = ()):
    if value == "":
        return {"optimizer_type": "AdamW"}, []
    by_lower = {c.lower(): c for c in choices}
    return {"optimizer_type": by_lower.get(str(value).lower(), value)}, []


HANDLERS: dict[str, Callable] = {
    "resolution": lambda v, where, f: ({"resolution": parse_resolution(v, where)}, []),
    "network_module": _network_module,
    "network_args": _network_args,
    "optimizer_args": _optimizer_args,
    "network_train_unet_only": lambda v, where, f: ({"train_text_encoder": not v}, []),
    "network_train_text_encoder_only": _refused(
        "network_train_text_encoder_only trains no U-Net; preference training needs it"),
    "unet_lr": _learning_rate_of("unet", "unet_lr"),
    "text_encoder_lr": _learning_rate_of("text_encoder", "text_encoder_lr"),
    "sample_prompts": lambda v, where, f: ({"sample_prompts": read_sample_prompts(v, where)}, []),
    "sdpa": lambda v, where, f: ({}, []),  # PyTorch SDPA is the attention unless xformers is on
    **{key: _only_if_field(key) for key in ("clip_skip", "save_precision", "network_weights",
                                            "conv_dim", "conv_alpha", "use_dora")},
}


def translate(flat: dict, where: str, fields: Iterable[str], *, strict: bool = False,
              optimizer_types: Iterable[str] = ()) -> tuple[dict, list[str]]:
    """sd-scripts keys -> ({our bare key: value}, [keys not used here]).

    `fields`: this project's bare setting names (taken as they are). `strict` (the command line):
    a name neither setting nor sd-scripts option raises, with the closest name.
    """
    fields = set(fields)
    out: dict = {}
    unused: list[str] = []
    for key, value in flat.items():
        if key in ("config_file", "output_config") or value is None:
            continue
        if key == "optimizer_type":
            mapped, extra = _optimizer_type(value, where, fields, optimizer_types)
        elif key in HANDLERS:
            mapped, extra = HANDLERS[key](value, where, fields)
        elif key in RENAMED:
            mapped, extra = {RENAMED[key]: value}, []
        elif key in KNOWN_UNUSED:  # sd-scripts' meaning first (its loss_type is not an objective's)
            mapped, extra = {}, ([] if is_neutral(key, value) else [key])
        elif key in fields:
            mapped, extra = {key: value}, []
        elif strict:
            import difflib
            match = difflib.get_close_matches(key, sorted(fields | KNOWN_UNUSED), n=1, cutoff=0.5)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise SdScriptsError(f"{where}: unknown option '--{key}'{hint}")
        else:
            mapped, extra = {}, ([] if is_neutral(key, value) else [key])
        out.update(mapped)
        unused.extend(extra)
    if flat.get("dataset_config"):  # sd-scripts reads train_data_dir only without one
        out["train_data"] = flat["dataset_config"]
    if "wandb_run_name" in unused and flat.get("wandb_run_name") == flat.get("output_name"):
        unused.remove("wandb_run_name")  # the run is named by output_name anyway
    return out, unused
