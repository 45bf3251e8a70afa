"""Quality report of a toy pipeline: fidelity, reward spread, timings.

    python -m sipo_plugin.toy.report [--model DIR] [--n 256] [--grid out.png]

Prints, for base samples (20 DDIM steps, the default guidance): fidelity, each reward's mean,
its std within a prompt and the mean |difference| between the two images of a pair; the time to
sample n images and of one LoRA Diffusion-DPO step (4 pairs: U-Net
forward on 8 latents with grad, 8 without, backward, AdamW step).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

from .evaluate import eval_set
from .fidelity import fidelity
from .pipeline import DEFAULT_GUIDANCE, load_toy_pipeline, sample_images
from .rewards import get_reward


def within_prompt_std(values: np.ndarray, prompts: list[str]) -> float:
    """Root of the mean within-prompt variance (ddof=1) of values [N]."""
    groups: dict[str, list[float]] = defaultdict(list)
    for v, p in zip(values, prompts, strict=True):
        groups[p].append(float(v))
    var = [np.var(g, ddof=1) for g in groups.values() if len(g) > 1]
    return float(np.sqrt(np.mean(var))) if var else float("nan")


def pair_mean_abs_diff(values: np.ndarray, prompts: list[str]) -> float:
    """Mean |v_i - v_j| over all pairs i < j of samples sharing a prompt."""
    groups: dict[str, list[float]] = defaultdict(list)
    for v, p in zip(values, prompts, strict=True):
        groups[p].append(float(v))
    diffs = [abs(a - b) for g in groups.values() for i, a in enumerate(g) for b in g[i + 1 :]]
    return float(np.mean(diffs)) if diffs else float("nan")


def lora_dpo_step_seconds(pipe, n_steps: int = 20, rank: int = 4) -> float:
    """Mean seconds of one LoRA Diffusion-DPO step (4 pairs) on a copy of pipe's U-Net."""
    import copy

    from peft import LoraConfig

    from ..models.peft_lora import inject_lora, set_lora_enabled

    unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    inject_lora(unet, LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = pipe.tokenizer(["a red circle on a gray background"] * 8, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        cond = pipe.text_encoder(ids.input_ids)[0]  # [8, L, D]
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(8, 4, size, size, generator=gen)
    noise = torch.randn(z.shape, generator=gen)
    t = torch.randint(0, 1000, (4,), generator=gen).repeat(2)
    noisy = pipe.scheduler.add_noise(z, noise, t)

    def step() -> None:
        pred = unet(noisy, t, cond).sample  # [8, 4, h, w], winners then losers
        with torch.no_grad():
            set_lora_enabled(unet, False)
            ref = unet(noisy, t, cond).sample
            set_lora_enabled(unet, True)
        err, ref_err = ((pred - noise) ** 2).mean((1, 2, 3)), ((ref - noise) ** 2).mean((1, 2, 3))
        inside = (err[:4] - err[4:]) - (ref_err[:4] - ref_err[4:])
        loss = -torch.nn.functional.logsigmoid(-2500.0 * inside).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    return (time.perf_counter() - t0) / n_steps


def report(model: str | None, n: int, guidance: float, grid: str | None) -> dict:
    pipe = load_toy_pipeline(model)
    prompts, seeds = eval_set(n)
    t0 = time.perf_counter()
    images = sample_images(pipe, prompts, seeds, guidance_scale=guidance)
    out = {"sample_seconds": time.perf_counter() - t0, "n": n, "guidance": guidance,
           "fidelity": float(fidelity(images, prompts).mean())}
    for name in ("colour", "geometry"):
        r = get_reward(name)(images, prompts)
        out[f"{name}_mean"] = float(r.mean())
        out[f"{name}_std_within_prompt"] = within_prompt_std(r, prompts)
        out[f"{name}_pair_mean_abs_diff"] = pair_mean_abs_diff(r, prompts)
    out["dpo_step_seconds"] = lora_dpo_step_seconds(pipe)
    if grid:
        from .evaluate import save_grid

        save_grid(images[:16], images[16:32], grid)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m sipo_plugin.toy.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="pipeline folder (default: the bundled one)")
    p.add_argument("--n", type=int, default=256, help="eval-set images to sample")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--grid", default=None, help="write 32 samples as a PNG grid here")
    a = p.parse_args(argv)
    out = report(a.model, a.n, a.guidance, a.grid)
    for k, v in out.items():
        print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    return out


if __name__ == "__main__":
    main()
