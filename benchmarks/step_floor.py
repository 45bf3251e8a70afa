"""The trainer's step against its floor, per objective, with and without caches, on the toy and the
mid-size SD1.5-architecture model, in one run.

    OMP_NUM_THREADS=1 python benchmarks/step_floor.py [--rounds 3] [--sizes toy mid] [--compile]

The floor is the compute a LoRA step cannot avoid, run outside the trainer on one fixed batch with
its own copy of the model: the policy forward + backward and the AdamW step, plus the reference
forward (the adapter switched off, no grad) for the preference objectives (not for SFT), plus the
VAE and text-encoder forwards when nothing is cached. The trainer's step is one iteration of
``sipo_plugin.training.loop.train``'s loop (from one ``train_step`` call to the next: data, draws,
both forwards, objective, backward, clipping, optimizer, metrics). Each trainer step is paired
with a floor step run just before it in the same process, so both see the same load; the ratio is
that of the medians. "sft + reference" is SFT as it ran before objectives declared that they need
no reference (the reference forward forced back on; its floor includes the reference). Every
configuration runs once per round, rounds interleave the configurations, and each number is the
median over rounds x steps of this process's CPU time (``time.process_time``: steadier than wall
time on a shared machine). Preference objectives use a fixed kappa (30.0), so no calibration pass
is timed or paid for.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
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
    name: str  # an objective, "sft + reference" or "diffusion-dpo + compile"
    cache: str  # a CACHES key

    @property
    def label(self) -> str:
        return f"{self.size} / {self.cache} / {self.name}"

    @property
    def floor_has_reference(self) -> bool:
        return self.name != "sft"


def measures(sizes: list[str], compile_mid: bool, only: list[str] | None) -> list[Measure]:
    """Every configuration of the run (``only``: those whose label contains one of the words)."""
    out = []
    for size in sizes:
        for cache in CACHES:
            out += [Measure(size, name, cache) for name in (*OBJECTIVES, "sft + reference")]
        if compile_mid and size == "mid":
            out.append(Measure(size, "diffusion-dpo + compile", "cached"))
    return [m for m in out if not only or any(word in m.label for word in only)]


def trainer_overrides(size: str, cache: str, objective: str, model: str, manifest: Path,
                      out: Path, steps: int, batch: int) -> list[str]:
    """The trainer's settings of one measured configuration (also step_before_after.py's)."""
    kappa = ["--kappa", "30.0"] if objective in ("dpo-cm", "sipo") else []
    return ["--pretrained_model_name_or_path", model, "--train_data", str(manifest),
            "--output_dir", str(out), "--resolution", str(RESOLUTION[size]),
            "--objective", objective, *kappa, "--learning_rate", "1e-5",
            "--max_train_steps", str(steps), "--train_batch_size", str(batch),
            "--logging_steps", str(steps), *CACHES[cache]]


def config_for(m: Measure, model: str, manifest: Path, out: Path, steps: int, batch: int):
    from sipo_plugin.training.config import load_config
    objective = {"sft + reference": "sft", "diffusion-dpo + compile": "diffusion-dpo"}.get(
        m.name, m.name)
    compiled = ["--compile", "true"] if m.name.endswith("+ compile") else []
    return load_config(None, [*trainer_overrides(m.size, m.cache, objective, model, manifest, out,
                                                 steps, batch), *compiled])


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


class FloorStep:
    """One floor step per call on its own copy of the model and a fixed batch (see the module
    docstring); returns its CPU seconds."""

    def __init__(self, m: Measure, config):
        import torch

        from sipo_plugin.data import read_pairs
        from sipo_plugin.models import get_model_adapter
        from sipo_plugin.training.loop import make_dataloader
        self.live, self.reference = m.cache == "live", m.floor_has_reference
        adapter = get_model_adapter(config.model.family).load(config.model,
                                                              device=torch.device("cpu"))
        self.optimizer = torch.optim.AdamW(adapter.add_trainable(config.network),
                                           lr=config.training.learning_rate)
        self.batch = next(iter(make_dataloader(config, read_pairs(config.data.train_data),
                                               total=1)))
        self.generator = torch.Generator().manual_seed(0)
        self.adapter, self.layers = adapter, adapter.lora_layers(adapter.unet)
        self.latents, self.states = self.encode()
        self.noise = torch.randn(self.latents.shape, generator=self.generator)
        pairs = self.latents.shape[0] // 2
        self.t = torch.randint(0, 1000, (pairs,), generator=self.generator).repeat(2)

    def encode(self):
        import torch
        latents = self.adapter.encode_images(self.batch.pixel_values, self.generator)
        with torch.no_grad():
            cond = self.adapter.encode_prompts(self.batch.prompts)
        return latents, self.adapter.pair_conditioning(cond, self.batch)["encoder_hidden_states"]

    def __call__(self) -> float:
        import torch
        start = time.process_time()
        latents, states = self.encode() if self.live else (self.latents, self.states)
        unet = self.adapter.unet
        noisy = self.adapter.make_noisy(latents, self.noise, self.t)
        pred = unet(noisy.noisy, self.t, states, return_dict=False)[0]
        (pred - noisy.target).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.reference:
            with torch.no_grad():
                for layer in self.layers:
                    layer.enable_adapters(False)
                unet(noisy.noisy, self.t, states, return_dict=False)
                for layer in self.layers:
                    layer.enable_adapters(True)
        return time.process_time() - start


@contextlib.contextmanager
def paired_steps(floor: FloorStep, trainer: list[float], floors: list[float]):
    """Each ``train_step`` call runs a floor step first; ``trainer`` gets the CPU time of each
    loop iteration without it (from the end of one floor step to the start of the next; the last
    iteration ends when ``train`` returns)."""
    from sipo_plugin.training import loop
    original, starts, ends = loop.train_step, [], []

    def paired(*args, **kwargs):
        starts.append(time.process_time())
        floors.append(floor())
        ends.append(time.process_time())
        return original(*args, **kwargs)

    loop.train_step = paired
    try:
        yield
    finally:
        loop.train_step = original
        starts.append(time.process_time())
        trainer.extend(b - a for a, b in zip(ends, starts[1:]))


def measure_steps(m: Measure, config, warmup: int) -> tuple[list[float], list[float]]:
    """(trainer step, floor step) CPU seconds of the timed steps."""
    from sipo_plugin.training import loop
    floor = FloorStep(m, config)
    trainer, floors = [], []
    context = sft_with_reference() if m.name == "sft + reference" else contextlib.nullcontext()
    with context, paired_steps(floor, trainer, floors):
        loop.train(config)
    return trainer[warmup:-1], floors[warmup:-1]  # the last also holds the end-of-run logging


def run_round(plan: list[Measure], models: dict, manifest: Path, args, results: dict) -> None:
    for m in plan:
        steps, warmup = args.steps[m.size], args.warmup + 2 * m.name.endswith("+ compile")
        with tempfile.TemporaryDirectory() as tmp:
            config = config_for(m, models[m.size], manifest, Path(tmp) / "out",
                                warmup + steps + 1, args.batch)
            trainer, floor = measure_steps(m, config, warmup)
        results.setdefault(m.label, {"trainer": [], "floor": []})
        results[m.label]["trainer"] += trainer
        results[m.label]["floor"] += floor
        print(f"  {m.label:45s} trainer {1000 * statistics.median(trainer):9.1f} ms CPU, floor "
              f"{1000 * statistics.median(floor):9.1f} ms", file=sys.stderr, flush=True)


def median_ms(results: dict, m: Measure, kind: str = "trainer") -> float | None:
    return 1000 * statistics.median(results[m.label][kind]) if m.label in results else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b is not None else ""


def table(plan: list[Measure], results: dict) -> str:
    """The cost table: each trainer step's median CPU ms, its paired floor's, their ratio, and
    the step against Diffusion-DPO's trainer step with the same model and caches."""
    rows = ["| model | caches | objective | trainer step, CPU ms | floor, CPU ms | trainer / floor "
            "| vs diffusion-dpo |", "|---|---|---|---:|---:|---:|---:|"]
    for m in plan:
        ms, floor = median_ms(results, m), median_ms(results, m, "floor")
        dpo = median_ms(results, Measure(m.size, "diffusion-dpo", m.cache))
        rows.append(f"| {m.size} | {m.cache} | {m.name} | {ms:.1f} | {floor:.1f} | "
                    f"{ratio(ms, floor)} | {ratio(ms, dpo)} |")
    for size, cache in sorted({(m.size, m.cache) for m in plan}):
        before = median_ms(results, Measure(size, "sft + reference", cache))
        after = median_ms(results, Measure(size, "sft", cache))
        if before and after:
            rows.append(f"\nSFT without the reference, {size} / {cache}: {before / after:.2f}x "
                        "faster than SFT with it")
    return "\n".join(rows)


def sizes_side_by_side(args) -> dict:
    """Each size in its own process (this script with ``--sizes SIZE --jobs 1``), at once: more
    of a shared machine's CPU, the same CPU time per step."""
    import subprocess
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for size in args.sizes:
            command = [sys.executable, __file__, "--sizes", size, "--jobs", "1", "--json",
                       str(Path(tmp) / f"{size}.json"), "--rounds", str(args.rounds),
                       "--toy-steps", str(args.toy_steps), "--mid-steps", str(args.mid_steps),
                       "--warmup", str(args.warmup), "--batch", str(args.batch),
                       *(["--compile"] if args.compile else []),
                       *(["--only", *args.only] if args.only else [])]
            jobs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        if any(job.wait() != 0 for job in jobs):
            raise SystemExit("a size's run failed (its output is above)")
        results = {}
        for size in args.sizes:
            results.update(json.loads((Path(tmp) / f"{size}.json").read_text()))
    return results


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
    parser.add_argument("--jobs", type=int, default=2,
                        help="sizes measured side by side, one process each (one thread each)")
    args = parser.parse_args()
    args.steps = {"toy": args.toy_steps, "mid": args.mid_steps}
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from low_vram import CACHE, build_midsize_sd15
    from test_training import make_rendered_pairs

    started, cpu_started = time.time(), time.process_time()
    models = {"toy": "toy", "mid": str(build_midsize_sd15(CACHE / "midsize_sd15"))}
    plan = measures(args.sizes, args.compile, args.only)
    results: dict[str, dict[str, list[float]]] = {}
    if args.jobs > 1 and len(args.sizes) > 1:
        results = sizes_side_by_side(args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            manifest = make_rendered_pairs(Path(tmp) / "pairs", n_pairs=8)
            for r in range(args.rounds):
                print(f"round {r + 1} of {args.rounds}", file=sys.stderr, flush=True)
                run_round(plan, models, manifest, args, results)
    load = os.getloadavg()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu_started + children.ru_utime + children.ru_stime
    print(f"{args.batch} pairs/step, toy at {RESOLUTION['toy']} px, mid-size at "
          f"{RESOLUTION['mid']} px, {torch.get_num_threads()} thread(s); median of {args.rounds} "
          f"rounds x {args.toy_steps} (toy) / {args.mid_steps} (mid) steps; "
          f"{time.time() - started:.0f} s wall, {cpu:.0f} s CPU; load average at the end "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores\n")
    print(table(plan, results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
