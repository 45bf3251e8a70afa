"""Peak memory and step time of each low-VRAM option and reference mode, relative to plain LoRA.

    python benchmarks/low_vram.py [--steps 8] [--batch 2] [--resolution 256] [--threads 2]

The model is a mid-size SD1.5-architecture pipeline built from config (U-Net channels
128/256/512/512 with SD1.5's block layout, CLIP text encoder of width 512, SD VAE layout at
half width), saved once to benchmarks/.cache/midsize_sd15 in the diffusers layout, and trained on
rendered toy pairs. Every configuration runs in its own subprocess, so its peak RSS is its own;
the step time is the median over the steps after the first two. This CPU has no GPU: peak RSS
stands in for VRAM (weights, activations, optimizer states), and CUDA-only options (xformers) are
reported as not measurable here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from timing import peak_rss_mb, timed_train_steps, trained_parameters

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"

# name -> preset overrides on top of the plain LoRA run; every configuration is one column set
CONFIGURATIONS = {
    "lora (plain, fp32, AdamW)": [],
    "lora + gradient_checkpointing": ["--gradient_checkpointing", "true"],
    "lora + AdamW8bit": ["--optimizer_type", "AdamW8bit"],
    "lora + Adafactor": ["--optimizer_type", "Adafactor"],
    "lora + bf16 mixed precision": ["--mixed_precision", "bf16"],
    "lora + cache latents + text encoder outputs": ["--cache_latents", "true",
                                                    "--cache_text_encoder_outputs", "true"],
    "lora, reference = frozen_copy": ["--reference", "frozen_copy"],
    "lora, reference = cached": ["--reference", "cached", "--cache_latents", "true"],
    "lora, every low-VRAM option": ["--gradient_checkpointing", "true", "--optimizer_type",
                                    "AdamW8bit", "--mixed_precision", "bf16", "--cache_latents",
                                    "true", "--cache_text_encoder_outputs", "true"],
    "full, reference = frozen_copy": ["--finetune", "full", "--reference", "frozen_copy"],
    "full, reference = frozen_copy (bf16)": ["--finetune", "full", "--reference", "frozen_copy",
                                             "--reference_dtype", "bf16"],
    "full, reference = cached": ["--finetune", "full", "--reference", "cached", "--cache_latents",
                                 "true"],
    "full, every low-VRAM option (cached reference and encoders, AdamW8bit, full_bf16, "
    "checkpointing)": [
        "--finetune", "full", "--reference", "cached", "--cache_latents", "true",
        "--cache_text_encoder_outputs", "true", "--optimizer_type", "AdamW8bit",
        "--mixed_precision", "bf16", "--full_bf16", "true", "--gradient_checkpointing", "true"],
}


def build_midsize_sd15(folder: Path) -> Path:
    """A mid-size SD1.5-architecture diffusers folder (built once, seeded)."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sipo_plugin.toy.domain import all_prompts
    from sipo_plugin.toy.tokenizer import build_tokenizer

    torch.manual_seed(0)
    words = sorted({w for p in all_prompts() for w in p.split()})
    tokenizer = build_tokenizer(words, model_max_length=77)
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        cross_attention_dim=512, attention_head_dim=8)  # SD1.5's block types, fewer channels
    vae = AutoencoderKL(
        block_out_channels=(64, 128, 256, 256), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
        num_attention_heads=8, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def run_one(name: str, args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_training import make_rendered_pairs

    from sipo_plugin.training import loop
    from sipo_plugin.training.config import ConfigError, load_config

    work = CACHE / "low_vram_runs" / str(list(CONFIGURATIONS).index(name))
    manifest = make_rendered_pairs(CACHE / "pairs", n_pairs=16)
    try:
        config = load_config(None, [
            "--pretrained_model_name_or_path", str(CACHE / "midsize_sd15"),
            "--train_data", str(manifest), "--output_dir", str(work), "--resolution",
            str(args.resolution), "--objective", "sipo", "--kappa", "30.0", "--learning_rate", "1e-5",
            "--max_train_steps", str(args.steps), "--train_batch_size", str(args.batch),
            "--logging_steps", str(args.steps), "--overwrite", "true",  # a rerun replaces it
            *CONFIGURATIONS[name]])
    except ConfigError as err:
        return {"name": name, "skipped": str(err)}
    with timed_train_steps() as times:
        result = loop.train(config)
    return {"name": name, "step_s": statistics.median(times.wall[2:]),
            "step_cpu_s": statistics.median(times.cpu[2:]),
            "trained_params": trained_parameters(result.adapter),
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    build_midsize_sd15(CACHE / "midsize_sd15")
    rows = []
    for name in args.only or CONFIGURATIONS:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--resolution", str(args.resolution),
                              "--threads", str(args.threads)], capture_output=True, text=True)
        if out.returncode != 0:
            rows.append({"name": name, "skipped": out.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = next(r for r in rows if "step_s" in r)
    print(f"\nmid-size SD1.5 architecture, {args.batch} pairs/step at {args.resolution} px, "
          f"{args.steps} steps, {args.threads} threads")
    print("| configuration | trained params | step CPU time (s) | vs plain | step wall (s) "
          "| peak RSS (MB) | vs plain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['name']} | not measured: {r['skipped']} | | | | | |")
            continue
        print(f"| {r['name']} | {r['trained_params']:,} | {r['step_cpu_s']:.2f} | "
              f"{r['step_cpu_s'] / base['step_cpu_s']:.2f} | {r['step_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f} |")
    print("| lora + xformers | not measurable here: xformers has no CPU kernels (falls back to "
          "SDPA) | | | | | |")


if __name__ == "__main__":
    main()
