"""Step time and peak RSS of one LoRA sipo step of a CogVideoX transformer on this machine.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/cogvideox_step.py --size tiny
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/cogvideox_step.py --size mid
        [--gradient-checkpointing] [--base-weights-dtype fp8]

The step is what a run with cached latents and text-encoder outputs does per micro-batch (the
presets' setting): noise and timestep per pair, policy forward + backward with the LoRA, reference
forward with the adapter off, the sipo objective, AdamW step. One pair (2 clips) per step.
Reported: wall and CPU seconds per step (the mean after the first step) and peak RSS.
``tiny``: the test model (tests/tiny_video.py), 9 frames of 16x32. ``mid``: 2 layers of 8 heads x
64 (inner 512), T5-width (4096) text of 226 tokens, latents of 13 frames x 30 x 44 (a 49-frame
240x352 clip; 4,290 tokens). Peak RSS is the process's (model building included).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sipo_plugin.models.cogvideox import CogVideoXAdapter  # noqa: E402
from sipo_plugin.objectives import get_objective  # noqa: E402
from tiny_video import tiny_cogvideox_components  # noqa: E402

SIZES = {
    "tiny": dict(transformer={}, latent=(3, 4, 2, 4), text=(16, 32)),
    "mid": dict(transformer=dict(num_attention_heads=8, attention_head_dim=64, in_channels=16,
                                 out_channels=16, time_embed_dim=512, text_embed_dim=4096,
                                 num_layers=2, sample_height=30, sample_width=44,
                                 sample_frames=49, max_text_seq_length=226),
                latent=(13, 16, 30, 44), text=(226, 4096)),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--base-weights-dtype", choices=["", "bf16", "fp8"], default="")
    args = parser.parse_args()
    size = SIZES[args.size]
    adapter = CogVideoXAdapter(tiny_cogvideox_components(0, **size["transformer"]),
                               device=torch.device("cpu"), weight_dtype=torch.float32,
                               base_weights_dtype=args.base_weights_dtype)
    if args.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    network = argparse.Namespace(network_dim=16, network_alpha=16.0,
                                 network_target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    params = adapter.add_lora(network)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    objective = get_objective("sipo", kappa=1.0)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *size["latent"], generator=gen)  # [2B = 2, F', C, h, w] (cached)
    cond = {"encoder_hidden_states": torch.randn(1, *size["text"], generator=gen)}
    times, cpu_times = [], []
    for step in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        pair_cond = adapter.pair_conditioning(cond, {})
        noisy = adapter.noisy_inputs(latents, [torch.Generator().manual_seed(step)])
        pred = adapter.predict(noisy.noisy, noisy.timesteps, pair_cond)
        with torch.no_grad(), adapter.reference():
            ref = adapter.predict(noisy.noisy, noisy.timesteps, pair_cond)
        out = objective(pred, ref, noisy.target, noisy.timesteps, adapter.noise_scheduler)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    transformer_params = sum(p.numel() for p in adapter.transformer.parameters())
    print(json.dumps({
        "size": args.size, "threads": torch.get_num_threads(), "latent": list(size["latent"]),
        "gradient_checkpointing": args.gradient_checkpointing,
        "base_weights_dtype": args.base_weights_dtype,
        "transformer_params": transformer_params, "lora_params": sum(p.numel() for p in params),
        "step_s_first": round(times[0], 3),
        "step_s_mean_after_first": round(sum(times[1:]) / max(1, len(times) - 1), 3),
        # CPU seconds of this process: the wall time on a shared machine includes waiting
        "step_cpu_s_mean_after_first": round(sum(cpu_times[1:]) / max(1, len(times) - 1), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()
