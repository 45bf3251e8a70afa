"""The trainer's step against its floor, per objective, with and without caches, on the toy and the
mid-size SD1.5-architecture model, in one run.

    OMP_NUM_THREADS=1 python benchmarks/step_floor.py [--rounds 3] [--sizes toy mid] [--compile]

The floor is the compute a LoRA step cannot avoid, run outside the trainer on one fixed batch:
the policy forward + backward and the AdamW step, plus the reference forward (the adapter switched
off, no grad) for the preference objectives, plus the VAE and text-encoder forwards when nothing is
cached. The trainer's step is one iteration of ``sipo_plugin.training.loop.train``'s loop (from
one ``train_step`` call to the next: data, draws, both forwards, objective, backward, clipping,
optimizer, metrics). "sft + reference" is SFT as it ran before objectives declared that they need
no reference (the reference forward is forced back on). Every configuration runs once per round,
rounds interleave the configurations, and each number is the median over rounds x steps of this
process's CPU time (``time.process_time``: steadier than wall time on a shared machine).
Preference objectives use a fixed kappa (30.0), so no calibration pass is timed or paid for.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

OBJECTIVES = ("sft", "diffusion-dpo", "dpo-cm", "sipo")
CACHES = {"live": [], "cached": ["--cache_latents", "true", "--cache_text_encoder_outputs", "true"]}
RESOLUTION = {"toy": 32, "mid": 128}


@dataclasses.dataclass(frozen=True)
class Measure:
    size: str
    kind: str  # "trainer", or "floor"
    name: str  # an objective, "sft + reference", "floor (policy)" or "floor (policy + reference)"
    cache: str  # a CACHES key

    @property
    def label(self) -> str:
        return f"{self.size} / {self.cache} / {self.name}"


def measures(sizes: list[str], compile_mid: bool, only: list[str] | None) -> list[Measure]:
    """Every configuration of the run (``only``: those whose label contains one of the words)."""
    out = []
    for size in sizes:
        for cache in CACHES:
            out += [Measure(size, "trainer", name, cache) for name in (*OBJECTIVES, "sft + reference")]
            out += [Measure(size, "floor", name, cache)
                    for name in ("floor (policy)", "floor (policy + reference)")]
        if compile_mid and size == "mid":
            out.append(Measure(size, "trainer", "diffusion-dpo + compile", "cached"))
    return [m for m in out if not only or any(word in m.label for word in only)]


def config_for(m: Measure, model: str, manifest: Path, out: Path, steps: int, batch: int):
    from sipo_plugin.training.config import load_config
    objective = {"sft + reference": "sft", "diffusion-dpo + compile": "diffusion-dpo"}.get(
        m.name, m.name if m.kind == "trainer" else "diffusion-dpo")
    kappa = ["--kappa", "30.0"] if objective in ("dpo-cm", "sipo") else []
    compiled = ["--compile", "true"] if m.name.endswith("+ compile") else []
    return load_config(None, [
        "--pretrained_model_name_or_path", model, "--train_data", str(manifest),
        "--output_dir", str(out), "--resolution", str(RESOLUTION[m.size]),
        "--objective", objective, *kappa, *compiled, "--learning_rate", "1e-5",
        "--max_train_steps", str(steps), "--train_batch_size", str(batch),
        "--logging_steps", str(steps), *CACHES[m.cache]])


@contextlib.contextmanager
def sft_with_reference():
    """SFT as before ``needs_reference``: the trainer runs the reference forward for it."""
    from sipo_plugin.objectives import registry
    spec = registry._SPECS["sft"]
    registry._SPECS["sft"] = dataclasses.replace(spec, needs_reference=True)
    try:
        yield
    finally:
        registry._SPECS["sft"] = spec


@contextlib.contextmanager
def timed_iterations(times: list[float]):
    """CPU time of each loop iteration: from one ``train_step`` call to the next (the last step
    ends when ``train`` returns)."""
    from sipo_plugin.training import loop
    original, marks = loop.train_step, []

    def marked(*args, **kwargs):
        marks.append(time.process_time())
        return original(*args, **kwargs)

    loop.train_step = marked
    try:
        yield
    finally:
        loop.train_step = original
        marks.append(time.process_time())
        times.extend(b - a for a, b in zip(marks, marks[1:]))


def trainer_steps(m: Measure, config, warmup: int) -> list[float]:
    from sipo_plugin.training import loop
    times: list[float] = []
    context = sft_with_reference() if m.name == "sft + reference" else contextlib.nullcontext()
    with context, timed_iterations(times):
        loop.train(config)
    return times[warmup:-1]  # the last iteration also holds the end-of-run logging


def floor_steps(m: Measure, config, warmup: int, steps: int) -> list[float]:
    """The floor of ``config``'s step on one fixed batch (see the module docstring)."""
    import torch

    from sipo_plugin.data import read_pairs
    from sipo_plugin.models import get_model_adapter
    from sipo_plugin.training.loop import make_dataloader

    adapter = get_model_adapter(config.model.family).load(config.model, device=torch.device("cpu"))
    params = adapter.add_trainable(config.network)
    optimizer = torch.optim.AdamW(params, lr=config.training.learning_rate)
    batch = next(iter(make_dataloader(config, read_pairs(config.data.train_data), total=1)))
    generator = torch.Generator().manual_seed(0)
    lora_layers = [layer for layer in adapter.unet.modules() if hasattr(layer, "enable_adapters")
                   and hasattr(layer, "lora_A")]

    def encode():
        latents = adapter.encode_images(batch["pixel_values"], generator)
        with torch.no_grad():
            cond = adapter.pair_conditioning(adapter.encode_prompts(batch["prompts"]), batch)
        return latents, cond["encoder_hidden_states"]

    latents, states = encode()
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, 1000, (latents.shape[0] // 2,), generator=generator).repeat(2)
    times = []
    for _ in range(warmup + steps):
        start = time.process_time()
        if m.cache == "live":
            latents, states = encode()
        noisy = adapter.make_noisy(latents, noise, t)
        pred = adapter.unet(noisy.noisy, t, states, return_dict=False)[0]
        (pred - noisy.target).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if m.name == "floor (policy + reference)":
            with torch.no_grad():
                for layer in lora_layers:
                    layer.enable_adapters(False)
                adapter.unet(noisy.noisy, t, states, return_dict=False)
                for layer in lora_layers:
                    layer.enable_adapters(True)
        times.append(time.process_time() - start)
    return times[warmup:]


def run_round(plan: list[Measure], models: dict, manifest: Path, args, results: dict) -> None:
    for m in plan:
        steps, warmup = args.steps[m.size], args.warmup + 2 * m.name.endswith("+ compile")
        with tempfile.TemporaryDirectory() as tmp:
            config = config_for(m, models[m.size], manifest, Path(tmp) / "out",
                                warmup + steps + 1, args.batch)
            if m.kind == "trainer":
                times = trainer_steps(m, config, warmup)
            else:
                times = floor_steps(m, config, warmup, steps)
        results.setdefault(m.label, []).extend(times)
        print(f"  {m.label:52s} {1000 * statistics.median(times):9.1f} ms CPU", file=sys.stderr,
              flush=True)


def median_ms(results: dict, m: Measure) -> float | None:
    return 1000 * statistics.median(results[m.label]) if m.label in results else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b is not None else ""


def table(plan: list[Measure], results: dict) -> str:
    """The cost table: each step's median CPU ms, against its floor (SFT: the policy alone) and
    against Diffusion-DPO's trainer step with the same model and caches."""
    rows = ["| model | caches | step | CPU ms (median) | vs its floor | vs diffusion-dpo |",
            "|---|---|---|---:|---:|---:|"]
    for m in plan:
        floor_name = "floor (policy)" if m.name == "sft" else "floor (policy + reference)"
        floor = median_ms(results, Measure(m.size, "floor", floor_name, m.cache))
        dpo = median_ms(results, Measure(m.size, "trainer", "diffusion-dpo", m.cache))
        ms = median_ms(results, m)
        rows.append(f"| {m.size} | {m.cache} | {m.name} | {ms:.1f} | "
                    f"{ratio(ms, floor) if m.kind == 'trainer' else ''} | {ratio(ms, dpo)} |")
    for size, cache in sorted({(m.size, m.cache) for m in plan}):
        before = median_ms(results, Measure(size, "trainer", "sft + reference", cache))
        after = median_ms(results, Measure(size, "trainer", "sft", cache))
        if before and after:
            rows.append(f"\nSFT without the reference, {size} / {cache}: {before / after:.2f}x "
                        "faster than SFT with it")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--toy-steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--mid-steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (compile: +2)")
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--sizes", nargs="*", default=["toy", "mid"], choices=["toy", "mid"])
    parser.add_argument("--compile", action="store_true",
                        help="also time diffusion-dpo with compile = true on the mid-size model")
    parser.add_argument("--only", nargs="*", help="configurations whose label has one of these")
    parser.add_argument("--json", type=Path, help="also write the step times here")
    args = parser.parse_args()
    args.steps = {"toy": args.toy_steps, "mid": args.mid_steps}
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from low_vram import CACHE, build_midsize_sd15
    from test_training import make_rendered_pairs

    started, cpu_started = time.time(), time.process_time()
    models = {"toy": "toy", "mid": str(build_midsize_sd15(CACHE / "midsize_sd15"))}
    plan = measures(args.sizes, args.compile, args.only)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_rendered_pairs(Path(tmp) / "pairs", n_pairs=8)
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}", file=sys.stderr, flush=True)
            run_round(plan, models, manifest, args, results)
    load = os.getloadavg()
    print(f"{args.batch} pairs/step, toy at {RESOLUTION['toy']} px, mid-size at "
          f"{RESOLUTION['mid']} px, {torch.get_num_threads()} thread(s); median of {args.rounds} "
          f"rounds x {args.toy_steps} (toy) / {args.mid_steps} (mid) steps; {time.time() - started:.0f} s wall, "
          f"{time.process_time() - cpu_started:.0f} s CPU; load average at the end "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores\n")
    print(table(plan, results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
