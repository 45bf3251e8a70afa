"""GPU memory and step time of every SD1.5 / SDXL preset, through the real trainer, with random
weights at the real architecture and resolution, against --estimate.

    python benchmarks/gpu_check.py --out OUT            # on a GPU: the real sizes (one command)
    python benchmarks/gpu_check.py --out OUT --tiny     # anywhere: tiny models at 64 px (smoke)

Models: SD1.5 (U-Net 859.5M) and SDXL base (U-Net 2.57B) built from their published configs
(sipo_plugin/estimate/architectures.py) with random weights on the GPU, saved once as fp16 diffusers
folders under OUT/models (the tokenizer is the toy byte-level CLIP tokenizer: nothing is read from
the network or the Hub). Data: rendered toy pairs, resized to each preset's resolution.

Each preset of presets/*.toml whose family is sd15 or sdxl runs as written (its resolution, pairs,
accumulation, precision, optimizer, caches, reference, checkpointing), plus a full fine-tuning
variant of each SDXL preset, for --steps optimizer steps (kappa calibrated on 8 pairs, no saving).
Recorded per run: the peak ``torch.cuda.max_memory_allocated`` over the training steps (reset at the
first step, so it holds everything resident then: weights, optimizer, caches on the device) and
over the whole run (caching and calibration included), the median seconds per optimizer step after
the first, and --estimate's total and its error. Written: OUT/gpu_check.json and OUT/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

FAMILIES = ("sd15", "sdxl")
TINY_RESOLUTION = 64
MIB = 2**20


def build_model(family: str, folder: Path, *, tiny: bool, device: str) -> Path:
    """A diffusers folder of ``family`` with random weights (fp16 for the real sizes)."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    if tiny:
        from tiny_models import tiny_sd15_pipeline
        from tiny_sdxl import tiny_sdxl_pipeline
        (tiny_sd15_pipeline if family == "sd15" else tiny_sdxl_pipeline)(0).save_pretrained(folder)
        return folder
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from sipo_plugin.estimate.architectures import PUBLISHED, SCHEDULER
    from sipo_plugin.estimate.build import build_module
    from tiny_models import tiny_clip_tokenizer
    torch.manual_seed(0)
    parts = {name: build_module(cls, cfg, device).to(torch.float16)
             for name, (cls, cfg) in PUBLISHED[family].items()}
    tokenizers = {"tokenizer": tiny_clip_tokenizer()}
    if family == "sd15":
        pipe = StableDiffusionPipeline(**parts, **tokenizers, scheduler=DDPMScheduler(**SCHEDULER),
                                       safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(**parts, **tokenizers, tokenizer_2=tiny_clip_tokenizer(),
                                         scheduler=DDPMScheduler(**SCHEDULER))
    pipe.save_pretrained(folder)
    del pipe, parts
    torch.cuda.empty_cache()
    return folder


def runs(presets: list[Path]) -> list[tuple[str, Path, list[str]]]:
    """(name, preset, extra overrides): every sd15 / sdxl preset (not the toy model's demo, not
    the online presets: their step is their offline twin's plus sampling, and they need a reward
    model), and SDXL full fine-tuning."""
    out = []
    for preset in presets:
        settings = tomllib.loads(preset.read_text())
        model = settings["model"]
        family = model.get("family", "sd15")
        if (family not in FAMILIES or model.get("pretrained_model_name_or_path") == "toy"
                or "online" in settings):
            continue
        out.append((preset.stem, preset, []))
        if family == "sdxl":
            out.append((preset.stem + " + finetune=full", preset, ["--finetune", "full"]))
    return out


def overrides(preset: Path, model: Path, manifest: Path, output: Path, steps: int, tiny: bool
              ) -> list[str]:
    """The preset's settings with this machine's model, data and a short run."""
    raw = tomllib.loads(preset.read_text())
    out = ["--pretrained_model_name_or_path", str(model), "--model_config", "",
           "--train_data", str(manifest), "--output_dir", str(output), "--overwrite", "true",
           "--max_train_steps", str(steps), "--lr_warmup_steps", "0", "--save_every_n_steps", "0",
           "--log_with", "none", "--calibration_pairs", "8", "--dataloader_num_workers", "0",
           "--sample_every_n_steps", "0", "--eval_after_training", "false", "--pairs_prompts", ""]
    if tiny:  # seconds on a CPU: tiny resolution, one micro-batch per step, at most 2 pairs
        batch = min(2, raw.get("training", {}).get("train_batch_size", 1))
        out += ["--resolution", str(TINY_RESOLUTION), "--gradient_accumulation_steps", "1",
                "--train_batch_size", str(batch), "--cpu", "true"]
    return out


def timed_training(cuda: bool):
    """Wrap the trainer's train_step: seconds per call (synchronized on CUDA) and, at the first
    call, reset CUDA's peak so it covers the training steps only."""
    import torch
    from sipo_plugin.training import loop
    original, times = loop.train_step, []

    def step(*args, **kwargs):
        if cuda:
            if not times:
                torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = original(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        return out

    return original, step, times


def run_one(name: str, preset: Path, extra: list[str], args, model: Path, manifest: Path) -> dict:
    import torch
    from sipo_plugin.estimate.estimate import estimate
    from sipo_plugin.training import loop
    from sipo_plugin.training.config import load_config
    cuda = torch.cuda.is_available() and not args.tiny
    config = load_config(preset, [*overrides(preset, model, manifest, args.out / "runs" / name,
                                             args.steps, args.tiny), *extra])
    predicted = estimate(config)
    row = {"run": name, "family": config.model.family, "finetune": config.network.finetune,
           "resolution": config.data.resolution, "pairs": config.training.train_batch_size,
           "accumulation": config.training.gradient_accumulation_steps,
           "estimate_mib": predicted.device_bytes() / MIB,
           "estimate_activations_mib": predicted.run_activations() / MIB}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    original, step, times = timed_training(cuda)
    loop.train_step = step
    try:
        whole = time.perf_counter()
        loop.train(config)
        row["wall_s"] = time.perf_counter() - whole
    finally:
        loop.train_step = original
    micro = config.training.gradient_accumulation_steps
    per_step = [sum(times[i:i + micro]) for i in range(0, len(times), micro)]
    row["s_per_step"] = statistics.median(per_step[1:] or per_step)
    if cuda:
        row["peak_training_mib"] = torch.cuda.max_memory_allocated() / MIB
        row["estimate_error"] = row["estimate_mib"] / row["peak_training_mib"] - 1
    return row


def gib(mib: float | None) -> str:
    return "n/a (CPU)" if mib is None else f"{mib / 1024:.2f}"


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"GPU check on {device}: peak torch.cuda.max_memory_allocated over the training steps",
             "", "| run | resolution | pairs x accumulation | peak (GiB) | estimate (GiB) | error "
             "| s/step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['run']} | not run: {r['skipped']} | | | | | |")
            continue
        error = f"{r['estimate_error']:+.0%}" if "estimate_error" in r else ""
        lines.append(f"| {r['run']} | {r['resolution']} | {r['pairs']} x {r['accumulation']} | "
                     f"{gib(r.get('peak_training_mib'))} | {gib(r['estimate_mib'])} | {error} | "
                     f"{r['s_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / ".cache" / "gpu_check")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models at 64 px on the CPU (automatic without CUDA)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument("--presets", nargs="*", help="preset names (default: every sd15 / sdxl one)")
    args = parser.parse_args(argv)
    import torch
    from test_training import make_rendered_pairs
    args.tiny = args.tiny or not torch.cuda.is_available()
    device = "cpu (tiny models)" if args.tiny else torch.cuda.get_device_name()
    presets = sorted((ROOT / "presets").glob("*.toml"))
    if args.presets:
        presets = [p for p in presets if p.stem in args.presets]
    manifest = make_rendered_pairs(args.out / "pairs", n_pairs=16)
    models, rows = {}, []
    for name, preset, extra in runs(presets):
        family = tomllib.loads(preset.read_text())["model"]["family"]
        if family not in models:
            models[family] = build_model(family, args.out / "models" / family, tiny=args.tiny,
                                         device="cuda" if not args.tiny else "cpu")
        try:
            rows.append(run_one(name, preset, extra, args, models[family], manifest))
        except Exception as err:  # noqa: BLE001  (one run's failure is a row, not the end)
            if not args.tiny and "out of memory" not in str(err).lower():
                raise
            rows.append({"run": name, "skipped": f"{type(err).__name__}: {str(err)[:200]}"})
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "steps": args.steps, "rows": rows}
    (args.out / "gpu_check.json").write_text(json.dumps(meta, indent=2))
    (args.out / "gpu_check.md").write_text(markdown(rows, device))
    print(markdown(rows, device))
    return rows


if __name__ == "__main__":
    main()
