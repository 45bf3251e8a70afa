"""``sipo-pairs sample``: K candidates per prompt from your model, each with its own recorded seed.

    sipo-pairs sample --preset P --prompts prompts.txt --out DIR [--candidates 4]
                      [--network_weights lora.safetensors] [--sample_sampler ddim]
                      [--sample_steps 30] [--guidance_scale 7.5] [--negative_prompt ...]
                      [--width 512 --height 512] [--batch_size 4]

The model is the preset's ([model]); sampler settings default to the preset's [sampling] keys,
then to the family's defaults (`sipo_plugin.pairs.sampler.FAMILY_DEFAULTS`). Writes DIR/images/
(PNG; GIF clips for video families), DIR/latents/<id>.safetensors (the sampler's final latents) and
DIR/candidates.jsonl. Resumable: ids already recorded are skipped; a record is appended only after
its image and latents are written (atomically), so a killed run never leaves a half-written file.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..utils.io import atomic_write_bytes, save_safetensors_atomic
from .candidates import (CANDIDATES_FILE, IMAGES_DIR, LATENTS_DIR, Candidate, CandidatesError,
                         append_candidate, candidate_id, read_candidates)
from .prompts import PromptEntry, PromptFileError, cycle_prompts, read_prompts
from .sampler import (SamplerSettings, SamplingError, candidate_seed, configure_pipeline,
                      generate, settings_for)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_identity(model_cfg, network_weights: str | None = None) -> dict:
    """What sampled a candidate: the family, the base model, the LoRA on top and its sha256."""
    return {"family": model_cfg.family,
            "pretrained_model_name_or_path": str(model_cfg.pretrained_model_name_or_path),
            "network_weights": str(network_weights) if network_weights else None,
            "network_sha256": file_sha256(network_weights) if network_weights else None}


def write_sample(folder: Path, cid: str, sample, model: dict) -> tuple[str, str]:
    """The image (or GIF clip) and the latents of one sample, each atomically; relative paths.
    The latents carry what they fit (family, base model, size), read by the training data."""
    from ..data.saved_latents import model_key
    from ..data.video import save_clip
    latents_rel = f"{LATENTS_DIR}/{cid}.safetensors"
    width, height = sample.frames[0].size
    meta = {"family": str(model.get("family", "")), "width": str(width), "height": str(height),
            "frames": str(len(sample.frames)),
            "model": model_key(str(model.get("pretrained_model_name_or_path", "")))}
    save_safetensors_atomic({"latents": sample.latents}, folder / latents_rel, metadata=meta)
    if len(sample.frames) > 1:
        image_rel = f"{IMAGES_DIR}/{cid}.gif"
        save_clip(sample.frames, folder / image_rel)
    else:
        image_rel = f"{IMAGES_DIR}/{cid}.png"
        buffer = io.BytesIO()
        sample.frames[0].save(buffer, format="PNG")
        atomic_write_bytes(folder / image_rel, buffer.getvalue())
    return image_rel, latents_rel


def _check_same_run(existing: list[Candidate], entries: list[PromptEntry], settings: dict,
                    model: dict, folder: Path) -> None:
    """Resuming into a folder sampled with other settings, model or prompts mixes two runs."""
    for record in existing:
        same_prompt = (record.prompt_index < len(entries)
                       and entries[record.prompt_index].prompt == record.prompt)
        if record.model != model or record.settings != settings or not same_prompt:
            raise CandidatesError(
                f"{folder / CANDIDATES_FILE}: holds candidates of other prompts, settings or "
                f"model (first: {record.id}); use a new --out folder or the same options")


def sample_candidates(adapter, entries: list[PromptEntry], out_dir: str | os.PathLike, *,
                      settings: SamplerSettings, candidates: int = 4, seed: int = 0,
                      batch_size: int = 4, model: dict | None = None,
                      progress: bool = True) -> list[Candidate]:
    """Sample ``candidates`` per prompt entry into ``out_dir``; returns every record of the folder.

    Candidate c of prompt p has seed ``candidate_seed(seed, p, c)``."""
    if candidates < 1 or batch_size < 1:
        raise SamplingError(f"candidates and batch_size must be >= 1, got {candidates}, {batch_size}")
    folder = Path(out_dir)
    model = model or {}
    recorded = settings.to_dict()
    existing = read_candidates(folder) if (folder / CANDIDATES_FILE).is_file() else []
    _check_same_run(existing, entries, recorded, model, folder)
    done = {record.id for record in existing}
    jobs = [(p, c) for p in range(len(entries)) for c in range(candidates)
            if candidate_id(p, c) not in done]
    total = len(entries) * candidates
    bar = tqdm(total=total, initial=total - len(jobs), desc="sample", unit="candidate",
               disable=not progress or not jobs, dynamic_ncols=True)
    pipe = configure_pipeline(adapter, settings) if jobs else None
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        seeds = [candidate_seed(seed, p, c) for p, c in batch]
        samples = generate(pipe, adapter, settings, [entries[p].prompt for p, _ in batch], seeds,
                           [entries[p].negative_prompt for p, _ in batch])
        for (p, c), s, sample in zip(batch, seeds, samples, strict=True):
            cid = candidate_id(p, c)
            image_rel, latents_rel = write_sample(folder, cid, sample, model)
            append_candidate(folder, Candidate(
                id=cid, prompt=entries[p].prompt, prompt_index=p, candidate_index=c, seed=s,
                path=image_rel, latents=latents_rel,
                negative_prompt=entries[p].negative_prompt or settings.negative_prompt,
                settings=recorded, model=model))
        bar.update(len(batch))
    bar.close()
    return read_candidates(folder)


# -- the command line ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help="TOML preset: its [model] is sampled, "
                        "its [sampling] keys are the defaults of the options below")
    parser.add_argument("--prompts", required=True,
                        help="prompt file: .txt (one a line) or .jsonl (prompt, negative_prompt)")
    parser.add_argument("--out", required=True, help="candidates folder DIR (created; resumable)")
    parser.add_argument("--candidates", type=int, default=4, help="candidates per prompt (4)")
    parser.add_argument("--num_prompts", type=int, default=0,
                        help="prompts to sample, the file's cycled in order (0: each once)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; candidate c of prompt p "
                        "gets its own seed from (seed, p, c), recorded in candidates.jsonl")
    parser.add_argument("--network_weights", help="a LoRA (.safetensors) applied on top")
    parser.add_argument("--sample_sampler", "--sampler", dest="sampler",
                        help="ddim, euler, euler_a, dpmsolver++, unipc, pndm, lms, heun, ddpm or "
                        "default (video: default only); family default: sd15 ddim, sdxl euler")
    parser.add_argument("--sample_steps", "--steps", dest="steps", type=int,
                        help="sampler steps (sd15/sdxl 30, video 50)")
    parser.add_argument("--guidance_scale", "--scale", dest="guidance_scale", type=float,
                        help="classifier-free guidance (sd15 7.5, sdxl 7, cogvideox 6, wan 5)")
    parser.add_argument("--negative_prompt", help="negative prompt (a .jsonl line's own wins)")
    parser.add_argument("--width", type=int, help="width in pixels (default: the model's)")
    parser.add_argument("--height", type=int, help="height in pixels (default: the model's)")
    parser.add_argument("--num_frames", type=int, help="video: frames per clip")
    parser.add_argument("--batch_size", type=int, help="samples per pipeline call (4)")
    parser.add_argument("--cpu", action="store_true", help="sample on the CPU even with a GPU")


def run(args: argparse.Namespace) -> int:
    from ..training.config import ConfigError
    try:
        preset = preset_sections(args.preset)
        entries = cycle_prompts(read_prompts(args.prompts), args.num_prompts)
        model_cfg, sampling = preset["model"], preset["sampling"]
        settings = settings_from(model_cfg.family, sampling, args)
        if args.network_weights and not Path(args.network_weights).is_file():
            raise SamplingError(f"{args.network_weights}: LoRA file not found (--network_weights)")
        adapter = load_sampling_adapter(model_cfg, cpu=args.cpu or preset["training"].cpu,
                                        network_weights=args.network_weights)
        records = sample_candidates(
            adapter, entries, args.out, settings=settings, candidates=args.candidates,
            seed=args.seed, batch_size=args.batch_size or sampling.sample_batch_size,
            model=model_identity(model_cfg, args.network_weights))
    except (ConfigError, PromptFileError, SamplingError, CandidatesError, OSError) as err:
        print(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished candidates are recorded; run the same command to resume")
        return 130
    print(f"{len(records)} candidates in {args.out} ({CANDIDATES_FILE}, {IMAGES_DIR}/, "
          f"{LATENTS_DIR}/)")
    return 0


def settings_from(family: str, sampling, args=None) -> SamplerSettings:
    """Command-line options over the preset's [sampling] keys over the family's defaults."""
    def pick(name, preset_value, unset):
        given = getattr(args, name, None) if args is not None else None
        return given if given is not None else (None if preset_value == unset else preset_value)
    return settings_for(
        family, sampler=pick("sampler", sampling.sampler, ""),
        steps=pick("steps", sampling.sampler_steps, 0),
        guidance_scale=pick("guidance_scale", sampling.guidance_scale, -1.0),
        negative_prompt=pick("negative_prompt", sampling.negative_prompt, ""),
        width=pick("width", sampling.width, 0), height=pick("height", sampling.height, 0),
        num_frames=pick("num_frames", sampling.sample_frames, 0))


def preset_sections(preset: str | os.PathLike) -> dict:
    """The preset's [model], [sampling] and [training] sections, validated on their own (sampling
    needs no pair data yet, so the rest of the preset is not checked here)."""
    from ..training.config import load_sections
    return load_sections(preset, ("model", "sampling", "training"))


def load_sampling_adapter(model_cfg, *, cpu: bool = False, network_weights: str | None = None):
    """The family's adapter on the GPU (unless ``cpu``) with an optional LoRA loaded on top."""
    from ..models import get_model_adapter
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    adapter = get_model_adapter(model_cfg.family).load(model_cfg, device=device)
    if network_weights:
        adapter.sampling_pipeline().load_lora_weights(str(network_weights))
    return adapter
