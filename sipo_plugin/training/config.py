"""The run configuration: a TOML preset (plus command-line overrides) -> validated, frozen dataclasses.

A preset has one table per section; every key name is unique across sections, so a command-line
override can name it bare (``--learning_rate 1e-4``) or qualified (``--training.learning_rate``).
Validation happens once, here, before any model loads: unknown keys are rejected with the closest
valid name, values are type-checked and range-checked, paths must exist; every problem found is
reported (``ConfigError.problems``), not only the first. Nothing here imports torch or diffusers
(``--check`` stays fast); the checks that read the model folder and the data are in checks.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..models.families import FAMILIES, check_family_config, check_video_config
from ..objectives.catalog import check_objective, objective_config_classes

TOY_MODEL = "toy"  # the bundled toy pipeline, sipo_plugin/toy/model
OPTIMIZER_TYPES = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy", "Lion", "Lion8bit")
TRACKERS = ("none", "tensorboard", "wandb")
REFERENCE_MODES = ("auto", "base", "initial", "frozen_copy", "cached")
SAVE_PRECISIONS = ("fp16", "bf16", "float")


class ConfigError(ValueError):
    """User-facing errors about the preset or an override: one line each (``problems``)."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


SEED_MAX = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy, torch and random)
# renamed keys: old name -> the one-line migration
MIGRATIONS = {
    "calibration_batches": "'calibration_batches' was replaced by 'calibration_pairs' (pairs, "
                           "whatever train_batch_size is): set calibration_pairs = batches x "
                           "train_batch_size (the old default 32 x 8 = 256)",
}


TOY_MIGRATION = ("{where}: the [toy] section is gone: toy pairs come from the same path as your "
                 "model's now; write [pairs] pairs_prompts = \"toy\", rewards = [\"colour\"] and "
                 "[evaluate] eval_after_training = true (see presets/demo.toml)")


def _help(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text}, **kwargs)
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class ModelConfig:
    family: str = _help("model family adapter: sd15, sdxl, cogvideox or wan", "sd15")
    pretrained_model_name_or_path: str = _help(
        "a diffusers folder, a single-file .safetensors checkpoint (offline: needs model_config), "
        "or 'toy'",
        TOY_MODEL,
    )
    model_config: str = _help(
        "for a single-file checkpoint: a local diffusers folder holding the model's configs (needed "
        "offline; online diffusers fetches its base model's)", ""
    )
    clip_skip: int = _help(
        "text-encoder layer the prompt is read from, sd-scripts / WebUI numbering: 0 = the family's "
        "default (SD1.5: 1, SDXL: 2), 1 = the last layer, 2 = the penultimate (hidden state -n, then "
        "the final layer norm on SD1.5); diffusers' encode_prompt(clip_skip=n-1) on SD1.5, "
        "clip_skip=n-2 on SDXL. Used in training, caching, sampling and evaluation", 0)
    # low-VRAM options of the large (video) families
    base_weights_dtype: str = _help(
        "storage dtype of the frozen base transformer: '' (as loaded), 'bf16', or 'fp8' (layerwise "
        "casting: float8_e4m3fn storage, upcast per layer for compute; about half of bf16's memory)",
        "")
    group_offload: bool = _help(
        "diffusers group offloading: frozen weights stay in CPU memory and come to the GPU as they "
        "run (cogvideox: the T5 text encoder; GPU only: ignored on CPU with a note)", False)
    vae_tiling: bool = _help("encode videos tile by tile (less VAE activation memory)", False)
    vae_slicing: bool = _help("encode a batch one video at a time (less VAE activation memory)", False)


@dataclass(frozen=True)
class DataConfig:
    train_data: str = _help(
        "pair data: a folder with w/ and l/ subfolders, a .jsonl / .csv manifest, or Pick-a-Pic v2 "
        ".parquet shard(s) (a file or a folder; needs pip install 'sipo-plugin[pickapic]')", ""
    )
    caption_extension: str = _help("caption file extension for folder pairs", ".txt")
    resolution: int = _help("training resolution in pixels (square, centre crop)", 512)
    dataloader_num_workers: int = _help("DataLoader worker processes", 0)
    skip_data_check: bool = _help(
        "skip decoding every image of the pair data before step 1 (the check stops a run on a "
        "corrupt image before it trains, at the cost of one pass over the images)", False)
    # aspect-ratio buckets and augmentation (sd-scripts names and defaults)
    enable_bucket: bool = _help(
        "aspect-ratio buckets of about resolution^2 pixels; both images of a pair share the bucket "
        "nearest the geometric mean of their aspect ratios, and a batch holds one bucket", False)
    min_bucket_reso: int = _help("smallest bucket side (a multiple of bucket_reso_steps)", 256)
    max_bucket_reso: int = _help("largest bucket side (a multiple of bucket_reso_steps)", 1024)
    bucket_reso_steps: int = _help("bucket sides are multiples of this", 64)
    caption_dropout_rate: float = _help(
        "probability that a pair trains with an empty prompt (decided per pair and epoch from seed)",
        0.0)
    flip_aug: bool = _help(
        "mirror both images of a pair left-right with probability 0.5 (one decision per pair and "
        "epoch, from seed)", False)
    # caching (sd-scripts names): encode once before training, then release the encoders
    cache_latents: bool = _help(
        "encode both images of every pair once before training (one VAE posterior sample per "
        "image, kept in memory) and move the VAE off the device", False)
    cache_latents_to_disk: bool = _help(
        "cache latents as safetensors under cache_dir, reused by later runs (implies cache_latents)",
        False)
    cache_text_encoder_outputs: bool = _help(
        "encode every distinct prompt once (plus \"\" for caption dropout) and move the text "
        "encoders off the device; not with train_text_encoder", False)
    cache_dir: str = _help("where cached latents and reference errors go ('': <output_dir>/cache)", "")
    # video families (cogvideox, wan): clips of num_frames frames (see sipo_plugin/data/video.py)
    num_frames: int = _help(
        "video: frames per clip, 4k+1 (e.g. 49 or 81); 0 for image families", 0)
    frame_fps: float = _help(
        "video: resample clips to this frame rate by timestamps (0: the file's own frames; frame "
        "folders are taken as they are)", 0.0)
    video_height: int = _help("video: clip height in pixels (resize + centre crop)", 480)
    video_width: int = _help("video: clip width in pixels (resize + centre crop)", 720)


@dataclass(frozen=True)
class NetworkConfig:
    network_dim: int = _help("LoRA rank", 8)
    network_alpha: float = _help("LoRA alpha; the LoRA output is scaled by alpha / rank", 8.0)
    network_weights: str = _help(
        "start from an existing LoRA: an sd-scripts/kohya or diffusers .safetensors file (or a "
        "folder holding pytorch_lora_weights.safetensors); its rank, alpha, targets, conv layers "
        "and DoRA are used (differences from this preset are named in one note)", "")
    conv_dim: int = _help(
        "LoCon: LoRA rank of the 3x3 convolutions in the U-Net's ResNet blocks and down/upsamplers "
        "(their 1x1 shortcut and time projection get network_dim), as sd-scripts' conv_dim; 0: off",
        0)
    conv_alpha: float = _help("LoCon: alpha of the conv layers (scale conv_alpha / conv_dim)", 1.0)
    use_dora: bool = _help(
        "DoRA (weight-decomposed LoRA, through peft): exported with dora_scale keys, which ComfyUI "
        "and diffusers load", False)
    network_target_modules: list = _help(
        "U-Net module names the LoRA wraps (peft target_modules)",
        ["to_q", "to_k", "to_v", "to_out.0"],
    )
    train_text_encoder: bool = _help("also train a LoRA on the text encoder's attention and MLP", False)
    text_encoder_target_modules: list = _help(
        "text-encoder module names the LoRA wraps",
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    )
    finetune: str = _help(
        "lora (train a LoRA, exported as a LoRA file) or full (every U-Net weight trains, the text "
        "encoder stays frozen; exported as a diffusers pipeline folder)", "lora")


@dataclass(frozen=True)
class ObjectiveConfig:
    name: str = _help("the objective, by registered name (see --list-objectives)", "sipo")
    hyperparameters: dict = _help("the objective's own hyper-parameters", {})


@dataclass(frozen=True)
class TrainingConfig:
    output_dir: str = _help("where the LoRA, metrics and samples go", "outputs/run")
    output_name: str = _help("file name of the exported LoRA (without extension)", "sipo_lora")
    seed: int = _help("random seed (data order, noise, timesteps, LoRA init)", 42)
    learning_rate: float = _help("learning rate (of every trained part without its own below)", 1e-4)
    unet_lr: float = _help("learning rate of the U-Net / transformer LoRA (0: learning_rate)", 0.0)
    text_encoder_lr: float = _help(
        "learning rate of the text-encoder LoRA with train_text_encoder (0: learning_rate)", 0.0)
    lr_scheduler: str = _help(
        "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial",
        "constant",
    )
    lr_warmup_steps: int = _help("warm-up steps of the LR schedule", 0)
    max_train_steps: int = _help("optimizer steps", 1000)
    max_train_epochs: int = _help(
        "when > 0: train this many passes over the pairs (repeats included) instead of "
        "max_train_steps (steps = epochs x ceil(batches per epoch / accumulation / processes))", 0)
    train_batch_size: int = _help("preference pairs per micro-batch (2x images)", 1)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", 1)
    mixed_precision: str = _help("no, fp16 or bf16 (accelerate autocast)", "no")
    max_grad_norm: float = _help("gradient clipping norm (0 disables)", 1.0)
    adam_beta1: float = _help("AdamW beta1", 0.9)
    adam_beta2: float = _help("AdamW beta2", 0.999)
    adam_weight_decay: float = _help("AdamW weight decay", 1e-2)
    adam_epsilon: float = _help("AdamW epsilon", 1e-8)
    skip_masked_timesteps: bool = _help(
        "dpo-cm / sipo (weight_model = \"step\"): timesteps below the first one at which a "
        "calibration pair was kept (all masked) are not drawn, and the loss is scaled by the "
        "share of timesteps kept, so its expectation is unchanged (BENCHMARKS.md)", False)
    compile: bool = _help(
        "torch.compile the trained network (U-Net / transformer); without a working "
        "torch.compile the run trains uncompiled, with a note", False)
    calibration_pairs: int = _help(
        "pairs used to calibrate kappa = 'auto' (at most the data's size; the same pairs and "
        "draws whatever train_batch_size is, and the same as --analyze; at 64 the masked share "
        "missed its target: BENCHMARKS.md)", 256)
    logging_steps: int = _help("optimizer steps between metric log lines", 10)
    save_every_n_steps: int = _help(
        "every N steps and at the end: a resumable checkpoint and the LoRA file "
        "{output_name}-{step:06d} (0: none)", 0)
    save_last_n: int = _help(
        "this run's checkpoints and step LoRA files kept (older ones are deleted)", 2)
    resume: str = _help(
        "resume from 'latest' (this run's newest in output_dir/checkpoints) or a checkpoint folder",
        "")
    overwrite: bool = _help(
        "a new run into an output_dir holding another run's checkpoints, LoRA files or metrics "
        "deletes them (without it the run stops)", False)
    log_with: str = _help(
        "extra tracker: none, tensorboard or wandb (run named by output_name; WANDB_MODE=offline "
        "works without an account); JSONL is always written", "none")
    cpu: bool = _help("force CPU even when a GPU is present", False)
    # the reference model (see sipo_plugin/training/reference.py for the trade-offs)
    reference: str = _help(
        "auto or base (LoRA: the base model, the adapter off; full: frozen_copy), initial (LoRA with "
        "network_weights: the starting LoRA, frozen), frozen_copy (a frozen copy of the U-Net), or "
        "cached (reference errors of reference_cache_draws noise/timestep "
        "draws per pair computed before training; needs cache_latents)", "auto")
    reference_device: str = _help("frozen copy's device: '' (the training device) or e.g. 'cpu'", "")
    reference_dtype: str = _help(
        "frozen copy's dtype: '' (the base weights' dtype), 'fp16', 'bf16' or 'fp32'", "")
    reference_cache_draws: int = _help(
        "reference = cached: (noise, timestep) draws stored per pair; training cycles through them",
        4)
    # memory (low VRAM)
    optimizer_type: str = _help(
        "AdamW, AdamW8bit (bitsandbytes; falls back to AdamW with a note), Adafactor, Prodigy "
        "(pip install prodigyopt; learning_rate 1.0), Lion or Lion8bit (bitsandbytes)", "AdamW")
    optimizer_args: list = _help(
        "extra optimizer arguments as sd-scripts writes them: [\"weight_decay=0.1\", "
        "\"betas=0.9,0.99\", \"d_coef=2\"] (values are Python literals)", [])
    gradient_checkpointing: bool = _help(
        "recompute activations in the backward pass: less memory, about 20-40% more time", False)
    xformers: bool = _help(
        "xformers attention on CUDA when installed (else PyTorch SDPA, with a note)", False)
    full_bf16: bool = _help(
        "store the trained weights (and their gradients) in bf16; needs mixed_precision = \"bf16\"",
        False)
    # sample images during training
    sample_every_n_steps: int = _help(
        "sample images for sample_prompts every N steps and at the end into output_dir/samples (0: off)",
        0)
    sample_prompts: list = _help("prompts for the sample images", [])
    sample_seed: int = _help("seed of the sample images (the same for every step)", 1234)
    sample_steps: int = _help("sampler steps of the sample images", 20)
    sample_guidance_scale: float = _help("classifier-free guidance of the sample images", 7.0)


@dataclass(frozen=True)
class ExportConfig:
    lora_format: str = _help(
        "kohya (sd-scripts keys: WebUI, ComfyUI, diffusers) or diffusers (PEFT keys); wan: wan "
        "(original Wan keys: ComfyUI, diffusers) or musubi (musubi-tuner keys)", "kohya"
    )
    save_precision: str = _help(
        "dtype of the exported weights: fp16 (half the size of float), bf16 or float; full "
        "fine-tuning: the saved denoiser's dtype", "fp16")


@dataclass(frozen=True)
class SamplingConfig:
    """How candidates ([pairs], `sipo-pairs sample`) and evaluation samples are drawn."""
    sampler: str = _help(
        "ddim, euler, euler_a, dpmsolver++, unipc, pndm, lms, heun, ddpm or default (the family's "
        "pipeline sampler; video: default only); '': the family's default (sd15 ddim, sdxl euler)",
        "")
    sampler_steps: int = _help("sampler steps (0: the family's default, 30 for SD, 50 for video)", 0)
    guidance_scale: float = _help(
        "classifier-free guidance (-1: the family's default: sd15 7.5, sdxl 7, cogvideox 6, wan 5)",
        -1.0)
    negative_prompt: str = _help("negative prompt (a .jsonl prompt's own wins)", "")
    width: int = _help("sample width in pixels (0: the model's native size)", 0)
    height: int = _help("sample height in pixels (0: the model's native size)", 0)
    sample_frames: int = _help("video: frames per sampled clip (0: the family's default)", 0)
    sample_batch_size: int = _help("samples per pipeline call", 4)


@dataclass(frozen=True)
class PairsConfig:
    """On-policy pairs made before training: sample -> score -> make (sipo_plugin.pairs)."""
    pairs_prompts: str = _help(
        "before training, sample candidates of these prompts (a .txt / .jsonl file, or 'toy'), "
        "score them with 'rewards' and write the pairs to train_data ('': train_data exists)", "")
    num_prompts: int = _help("prompts sampled, the file's cycled in order (0: each once)", 0)
    candidates: int = _help("candidates sampled per prompt", 4)
    pairs_seed: int = _help("base seed of the candidates (each gets its own, recorded)", 0)
    rewards: list = _help(
        "rewards that score the candidates, as `sipo-pairs score --reward` specs (see "
        "--list-rewards); several combine as a sum of per-reward z-scores", [])
    pair_strategy: str = _help("best_worst (one pair per prompt) or all (every pair over min_margin)",
                               "best_worst")
    min_margin: float = _help("all: smallest score margin a pair needs", 0.0)
    candidates_dir: str = _help("the candidates folder ('': <output_dir>/candidates)", "")


@dataclass(frozen=True)
class EvaluateConfig:
    """Base vs tuned on fixed (prompt, seed) samples: eval.json, a grid PNG, a reward curve."""
    eval_after_training: bool = _help(
        "after training, sample base and tuned with the same seeds and score them (eval.json)", False)
    eval_prompts: str = _help(
        "evaluation prompts: a .txt / .jsonl file or 'toy' ('': the held-out training prompts, "
        "or every training prompt when eval_holdout = 0)", "")
    eval_holdout: float = _help(
        "share of the training prompts held out of training for evaluation (with eval_prompts = '')",
        0.0)
    eval_samples: int = _help("(prompt, seed) samples evaluated; prompts are cycled", 64)
    eval_seed: int = _help("base seed of the evaluation samples (the same for base and tuned)", 1234)
    eval_rewards: list = _help("rewards scored ([]: the [pairs] rewards)", [])
    eval_network_weights: str = _help(
        "--evaluate without training: the LoRA evaluated ('': the run's exported LoRA)", "")
    evaluate_every_n_steps: int = _help(
        "log the current LoRA's mean reward (eval/<reward>) every N steps and at step 0 (0: off)", 0)
    eval_curve_samples: int = _help("samples of each reward-curve point (the first eval_samples)", 16)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    source: str = "<defaults>"  # the preset file, for messages and metadata

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def unchecked(cls, **fields: Any) -> "Config":
        """A Config built without validation, only to look for further problems of an invalid one
        (``--check`` reports the model folder's and the data's problems too)."""
        config = object.__new__(cls)
        for name, value in fields.items():
            object.__setattr__(config, name, value)
        return config

    def to_dict(self) -> dict:
        """Plain nested dict (TOML layout), for run metadata and checkpoints."""
        out = {}
        for section in SECTIONS:
            values = dataclasses.asdict(getattr(self, section))
            if section == "objective":
                values = {"name": values["name"], **values["hyperparameters"]}
            out[section] = values
        return out


SECTIONS = ("model", "data", "network", "objective", "training", "export", "sampling", "pairs",
            "evaluate")


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    cls = Config.__dataclass_fields__[section].default_factory
    return {f.name: f for f in dataclasses.fields(cls)}


def _key_index() -> dict[str, str]:
    """Bare key -> section, for every fixed key (objective hyper-parameters are open-ended)."""
    index = {}
    for section in SECTIONS:
        if section == "objective":
            index["objective"] = "objective"  # --objective sipo sets [objective] name
            continue
        for name in _section_fields(section):
            index[name] = section
    index.update(dict.fromkeys(MIGRATIONS, "training"))  # renamed: [training] says what replaced it
    return index


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, help) for every preset key: the README table is generated from it."""
    rows = []
    for section in SECTIONS:
        for name, f in _section_fields(section).items():
            if section == "objective" and name == "hyperparameters":
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((section, name, default, f.metadata.get("help", "")))
    return rows


def _closest(name: str, candidates) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_type(where: str, name: str, value: Any, default: Any) -> Any:
    """Coerce a TOML/CLI value to the type of the field's default, or raise ConfigError."""
    expected = type(default)
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
    elif expected is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    kind = {bool: "true or false", int: "an integer", float: "a finite number",
            list: "a list of strings", str: "a string"}[expected]
    raise ConfigError(f"{where}: '{name}' must be {kind}, got {value!r}")


def _build_section(section: str, values: dict, where: str):
    fields = _section_fields(section)
    cls = Config.__dataclass_fields__[section].default_factory
    if section == "objective":
        values = dict(values)
        name = values.pop("name", ObjectiveConfig.name)
        if not isinstance(name, str):
            raise ConfigError(f"{where}: [objective] 'name' must be a string, got {name!r}")
        return cls(name=name, hyperparameters=values)
    kwargs, problems = {}, []
    for key, value in values.items():
        if key in MIGRATIONS:
            problems.append(f"{where}: {MIGRATIONS[key]}")
            continue
        if key not in fields:
            others = {k for s in SECTIONS if s != "objective" for k in _section_fields(s)}
            hint = _closest(key, fields)
            if not hint and key in others:
                hint = f" (it belongs in [{_key_index()[key]}])"
            problems.append(f"{where}: unknown key '{key}' in [{section}]{hint or _closest(key, others)}")
            continue
        f = fields[key]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        try:
            kwargs[key] = _check_type(f"{where} [{section}]", key, value, default)
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return cls(**kwargs)


def _parse_override_value(text: str) -> Any:
    """A CLI value in TOML syntax (1e-4, true, ["a","b"], "x"); anything else is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str], unused: list[str] | None = None) -> dict:
    """Fold command-line options into the raw preset dict: this project's keys, and sd-scripts'
    spellings (`sipo_plugin.sdscripts`); sd-scripts options with no effect here go to `unused`."""
    from .config_layers import fold_command_line
    return fold_command_line(raw, overrides, [] if unused is None else unused)


def _drop_foreign_hyperparameters(preset: dict, merged: dict) -> dict:
    """When the command line switches the objective, the preset's hyper-parameters that the new
    objective does not take are dropped with a note; the command line's own are kept (and checked)."""
    name = merged.get("name", ObjectiveConfig.name)
    if name == preset.get("name", ObjectiveConfig.name):
        return merged
    try:
        accepted = _objective_fields(name)
    except (KeyError, ValueError, TypeError):
        return merged  # an unknown name is reported by validation
    dropped = [k for k in preset if k != "name" and k not in accepted and merged.get(k) == preset[k]]
    if dropped:
        print(f"note: objective '{name}' does not take the preset's {', '.join(dropped)}: ignored")
    return {k: v for k, v in merged.items() if k not in dropped}


def _objective_fields(name: str) -> set[str]:
    """The hyper-parameter names an objective takes, read from its registered config class."""
    classes = objective_config_classes()
    if name not in classes:
        raise KeyError(name)
    return {f.name for f in dataclasses.fields(classes[name])}


def _objective_hyperparameter_names() -> set[str]:
    """Every registered objective's hyper-parameters (plugins included): bare CLI names."""
    return {f.name for cls in objective_config_classes().values() for f in dataclasses.fields(cls)}


def load_config(preset: str | Path | None, overrides: list[str] | None = None, *,
                config_file: str | Path | None = None) -> Config:
    """Read a preset (and/or an sd-scripts ``config_file``), apply command-line overrides, validate
    everything; raise ConfigError with one clear line. Settings sd-scripts has and this project
    does not use are listed in one "not used here" line."""
    raw: dict = {}
    where = "<defaults>"
    if preset is not None:
        path = Path(preset)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"preset not found: {path} (see presets/ for examples)")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
    raw.pop("run", None)  # the [run] table of a run.toml written by a run: not a setting
    for section, values in raw.items():
        if section == "toy":
            raise ConfigError(TOY_MIGRATION.format(where=where))
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section [{section}]{_closest(section, SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: '{section}' must be a table ([{section}])")
    from .config_layers import with_config_file, with_dataset_config
    unused: list[str] = []
    if config_file is not None:
        raw = with_config_file(raw, config_file, unused)
        where = str(config_file) if preset is None else where
    preset_objective = dict(raw.get("objective", {}))
    raw = apply_overrides(raw, overrides or [], unused)
    raw["objective"] = _drop_foreign_hyperparameters(preset_objective, raw["objective"])
    raw = with_dataset_config(raw, unused)
    if unused:
        print(f"note: not used here (sd-scripts settings with no counterpart): {', '.join(unused)}")
    sections, problems = {}, []
    for section in SECTIONS:
        try:
            sections[section] = _build_section(section, raw.get(section, {}), where)
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    try:
        config = Config(**sections, source=where)
    except ConfigError as err:
        err.config = Config.unchecked(**sections, source=where)  # what --check reads further
        raise
    if not config.network.network_weights:
        return config
    from .network_start import LoraFileError, resolve_network_weights
    try:  # the LoRA a run starts from sets its rank, alpha, conv layers, DoRA, text encoders
        return resolve_network_weights(config)
    except LoraFileError as err:
        raise ConfigError(f"{where}: {err}") from None


def _validate(config: Config) -> None:
    """Every rule below runs; ConfigError lists each problem found (one line each)."""
    problems = []
    for rule in (_validate_ranges, _validate_choices, _validate_family, _validate_paths,
                 _validate_reference_and_caches, _validate_network_start_and_layers,
                 _validate_buckets_and_augmentation, _validate_sampling, _validate_objective):
        try:
            rule(config)
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)


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


def _validate_ranges(config: Config) -> None:
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


def _validate_choices(config: Config) -> None:
    t, m = config.training, config.model
    choices = {"mixed_precision": (t.mixed_precision, ("no", "fp16", "bf16")),
               "optimizer_type": (t.optimizer_type, OPTIMIZER_TYPES),
               "log_with": (t.log_with, TRACKERS),
               "lr_scheduler": (t.lr_scheduler, ("constant", "constant_with_warmup", "linear",
                                                  "cosine", "cosine_with_restarts", "polynomial"))}
    if m.family in FAMILIES:
        choices["lora_format"] = (config.export.lora_format, FAMILIES[m.family].lora_formats)
    problems = [f"{config.source}: '{key}' must be one of {', '.join(allowed)}, got '{value}'"
                f"{_closest(value, allowed)}"
                for key, (value, allowed) in choices.items() if value not in allowed]
    if problems:
        raise ConfigError(problems)


def _validate_family(config: Config) -> None:
    """A known family, its own settings (e.g. wan: musubi LoRAs need the FFN targets) and, for the
    video families, the clip length and size."""
    where, family = config.source, config.model.family
    if family not in FAMILIES:
        raise ConfigError(f"{where}: unknown model family '{family}'; available: "
                          f"{', '.join(sorted(FAMILIES))}{_closest(family, FAMILIES)}")
    try:
        check_family_config(config)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    try:
        check_video_config(config)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _validate_network_start_and_layers(config: Config) -> None:
    """network_weights, reference = "initial", LoCon, DoRA, clip_skip, save_precision (one line
    each, naming the fix)."""
    where, t, n = config.source, config.training, config.network
    if config.export.save_precision not in SAVE_PRECISIONS:
        raise ConfigError(f"{where}: 'save_precision' must be one of {', '.join(SAVE_PRECISIONS)}, "
                          f"got '{config.export.save_precision}'"
                          f"{_closest(config.export.save_precision, SAVE_PRECISIONS)}")
    if config.model.clip_skip < 0 or n.conv_dim < 0:
        raise ConfigError(f"{where}: 'clip_skip' and 'conv_dim' must be >= 0")
    if n.conv_alpha <= 0:
        raise ConfigError(f"{where}: 'conv_alpha' must be > 0, got {n.conv_alpha}")
    if n.finetune == "full" and (n.network_weights or n.conv_dim or n.use_dora):
        raise ConfigError(f"{where}: network_weights, conv_dim and use_dora are LoRA settings; "
                          "finetune = \"full\" trains every U-Net weight (set finetune = \"lora\")")
    if t.reference == "initial" and not n.network_weights:
        raise ConfigError(f"{where}: reference = \"initial\" is the LoRA of network_weights, frozen; "
                          "set network_weights to a LoRA file, or reference = \"base\"")
    if n.network_weights:  # (reading LoRA files needs the export package: only when one is set)
        from ..export.lora_file import LORA_FILE_IN_FOLDER, network_weights_file
        file = network_weights_file(n.network_weights)
        if not file.is_file() or file.suffix != ".safetensors":
            raise ConfigError(f"{where}: network_weights: no LoRA file at {file} (give a "
                              f".safetensors LoRA, or a folder holding {LORA_FILE_IN_FOLDER})")


def _validate_paths(config: Config) -> None:
    where, m, d = config.source, config.model, config.data
    problems = []
    if m.pretrained_model_name_or_path != TOY_MODEL and not Path(m.pretrained_model_name_or_path).exists():
        problems.append(f"{where}: model not found: {m.pretrained_model_name_or_path} (set "
                        "pretrained_model_name_or_path to a diffusers folder or .safetensors file)")
    if m.model_config and not Path(m.model_config).is_dir():
        problems.append(f"{where}: model_config folder not found: {m.model_config}")
    if not d.train_data:
        problems.append(f"{where}: set [data] train_data to a pair folder or a .jsonl/.csv manifest")
    elif not config.pairs.pairs_prompts and not Path(d.train_data).exists():
        problems.append(f"{where}: train_data not found: {d.train_data} "
                        "(a folder with w/ and l/, or a .jsonl/.csv manifest)")
    if problems:
        raise ConfigError(problems)


def _validate_sampling(config: Config) -> None:
    """[sampling], [pairs], [evaluate]: ranges, strategies, reward names."""
    from ..evaluation.checks import check_pairs_and_evaluation
    try:
        check_pairs_and_evaluation(config)
    except ValueError as err:
        raise ConfigError(f"{config.source}: {err}") from None


def _validate_objective(config: Config) -> None:
    """The objective validates its own hyper-parameters (unknown names, ranges)."""
    try:
        check_objective(config.objective.name, config.objective.hyperparameters)
    except (KeyError, ValueError, TypeError) as err:
        message = err.args[0] if err.args else str(err)
        raise ConfigError(f"{config.source}: [objective] {message}") from None


def _validate_buckets_and_augmentation(config: Config) -> None:
    """[data] bucket settings (when enable_bucket) and caption_dropout_rate in [0, 1]."""
    from ..data.buckets import BucketSpec
    d = config.data
    if not 0.0 <= d.caption_dropout_rate <= 1.0:
        raise ConfigError(f"{config.source}: 'caption_dropout_rate' must be in [0, 1], "
                          f"got {d.caption_dropout_rate}")
    problem = BucketSpec(d.resolution, d.min_bucket_reso, d.max_bucket_reso,
                         d.bucket_reso_steps).problem() if d.enable_bucket else None
    if problem:
        raise ConfigError(f"{config.source}: {problem} (or set enable_bucket = false)")


def _validate_reference_and_caches(config: Config) -> None:
    """Cross-checks of finetune, reference and caching (one line each, naming the fix)."""
    where, t, d, n = config.source, config.training, config.data, config.network
    choices = {"finetune": (n.finetune, ("lora", "full")),
               "reference": (t.reference, REFERENCE_MODES),
               "reference_dtype": (t.reference_dtype, ("", "fp16", "bf16", "fp32"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{where}: '{key}' must be one of {', '.join(map(repr, allowed))}, "
                              f"got '{value}'{_closest(value, allowed)}")
    if t.reference_cache_draws <= 0:
        raise ConfigError(f"{where}: 'reference_cache_draws' must be > 0, got {t.reference_cache_draws}")
    if n.finetune == "full" and n.train_text_encoder:
        raise ConfigError(f"{where}: finetune = \"full\" trains the U-Net only; set "
                          "train_text_encoder = false")
    if d.cache_text_encoder_outputs and n.train_text_encoder:
        raise ConfigError(f"{where}: cache_text_encoder_outputs needs a frozen text encoder; set "
                          "train_text_encoder = false or cache_text_encoder_outputs = false")
    caches_latents = d.cache_latents or d.cache_latents_to_disk
    if caches_latents and getattr(d, "flip_aug", False):
        raise ConfigError(f"{where}: flip_aug cannot be used with cache_latents (the cache holds one "
                          "orientation); set flip_aug = false or cache_latents = false")
    if t.reference == "cached" and not caches_latents:
        raise ConfigError(f"{where}: reference = \"cached\" needs cache_latents = true (the cached "
                          "errors are for fixed latents)")
    if t.reference == "cached" and getattr(d, "caption_dropout_rate", 0.0) > 0:
        raise ConfigError(f"{where}: reference = \"cached\" cannot be used with caption_dropout_rate > 0 "
                          "(the cached errors are for the full caption); set caption_dropout_rate = 0")
    _validate_skip_masked_timesteps(config)
    copies = t.reference == "frozen_copy" or (t.reference in ("auto", "base") and n.finetune == "full")
    if (t.reference_device or t.reference_dtype) and not copies:
        raise ConfigError(f"{where}: reference_device / reference_dtype apply to a frozen copy only; "
                          "set reference = \"frozen_copy\" or leave them empty")
    if t.reference_device:
        _check_device(where, t.reference_device)


def _validate_skip_masked_timesteps(config: Config) -> None:
    """skip_masked_timesteps needs a mask that depends on the timestep (a step-wise weight) and
    fresh draws (a cached reference fixes each pair's timesteps before calibration)."""
    where, t = config.source, config.training
    if not t.skip_masked_timesteps:
        return
    try:
        hyper = check_objective(config.objective.name, config.objective.hyperparameters)
    except (KeyError, ValueError, TypeError):
        return  # reported by the objective's own validation
    if getattr(hyper, "weight_model", None) != "step" or not getattr(hyper, "mask_threshold", 0):
        raise ConfigError(f"{where}: skip_masked_timesteps needs an objective that masks pairs by "
                          "timestep (dpo-cm or sipo with weight_model = \"step\" and "
                          "mask_threshold > 0); set skip_masked_timesteps = false")
    if t.reference == "cached":
        raise ConfigError(f"{where}: skip_masked_timesteps cannot be used with reference = "
                          "\"cached\" (its draws are fixed before calibration); set one of them "
                          "off")


def _check_device(where: str, device: str) -> None:
    """reference_device names a device torch knows and this machine has (else a traceback at the
    copy, after the model loaded)."""
    import torch
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"{where}: 'reference_device' = '{device}' is not a device "
                          "(e.g. 'cpu', 'cuda', 'cuda:1')") from None
    is_available = getattr(getattr(torch, kind, None), "is_available", None)
    if kind != "cpu" and not (is_available and is_available()):
        raise ConfigError(f"{where}: 'reference_device' = '{device}': no {kind} device on this "
                          "machine; set reference_device = \"cpu\" or leave it empty")


def load_sections(preset: str | Path, sections: tuple[str, ...]) -> dict:
    """Some sections of a preset, each type-checked, without the whole-run validation (a step
    such as `sipo-pairs sample` needs the model before any pair data exists)."""
    path = Path(preset)
    if not path.is_file():
        raise ConfigError(f"preset not found: {path} (see presets/ for examples)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    if "toy" in raw:
        raise ConfigError(TOY_MIGRATION.format(where=path))
    out = {s: _build_section(s, raw.get(s, {}), str(path)) for s in sections}
    from ..models import available_model_families
    if "model" in out and out["model"].family not in available_model_families():
        raise ConfigError(f"{path}: unknown model family '{out['model'].family}'; available: "
                          f"{', '.join(available_model_families())}")
    return out
