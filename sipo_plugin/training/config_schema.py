"""The run's settings as frozen dataclasses: one per preset section, with each key's default and
help text (the README's settings table and --help are generated from them).

Schema only: building a `Config` checks nothing, reads no file and imports nothing heavy. Parsing
a preset into these sections is `config.py`; every rule across keys, files and devices is
`checks/`, run once at start-up by `config.load_config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .online_config import OnlineConfig

OPTIMIZER_TYPES = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy", "Lion", "Lion8bit")
TRACKERS = ("none", "tensorboard", "wandb")
REFERENCE_MODES = ("auto", "base", "initial", "frozen_copy", "cached")
SAVE_PRECISIONS = ("fp16", "bf16", "float")
SEED_MAX = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy, torch and random)


class ConfigError(ValueError):
    """User-facing errors about the preset or an override: one line each (``problems``)."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


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
        "toy",
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
    online: OnlineConfig = field(default_factory=OnlineConfig)
    source: str = "<defaults>"  # the preset file, for messages and metadata

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
            "evaluate", "online")
