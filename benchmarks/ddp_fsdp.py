"""Two processes on the mid-size model: the step time of accelerate's DDP against the hand-made
gradient averaging it replaced, and the per-process memory of FSDP2 against DDP, in one run.

    python benchmarks/ddp_fsdp.py [--steps 6] [--resolution 128] [--threads 1]

Every configuration trains the mid-size SD1.5-architecture model of benchmarks/low_vram.py with
two gloo processes on this CPU (no GPU here), 1 pair per process and step, as a LoRA and as a full
fine-tune (reference = frozen_copy):

- "hand-made averaging": the path the trainer had before issue 16, kept only in this file for
  comparison: the modules stay unwrapped and, after the backward pass of each optimizer step, every
  gradient is averaged by its own all-reduce (``accelerator.reduce``), nothing overlapped;
- "DDP": the trainer as it is (accelerate's DistributedDataParallel, bucketed all-reduce during
  the backward pass);
- "FSDP2": the trainer under configs/fsdp2.yaml's settings.

Step time: the median over the steps after the first two, per process (wall and CPU), the slower
process reported. Memory per process: the bytes of the trained modules' weights (frozen base
included: FSDP shards them too), of the gradients (one per trained weight) and of the optimizer
states this process holds after its last step, counted from the tensors (what FSDP shards; on a
GPU they dominate max_memory_allocated for full fine-tuning), and the process's peak RSS, which
here also counts the model loaded whole before sharding and the libraries.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
sys.path.insert(0, str(ROOT / "benchmarks"))

from low_vram import build_midsize_sd15  # noqa: E402
from timing import peak_rss_mb  # noqa: E402

PARALLELISMS = ("hand-made averaging", "DDP", "FSDP2")
FINETUNES = {"lora": [], "full": ["--finetune", "full", "--reference", "frozen_copy",
                                  "--learning_rate", "1e-6"]}


def use_hand_made_averaging() -> None:
    """The replaced path: no module prepared; after the backward pass of an optimizer step, one
    all-reduce (mean) per trained parameter."""
    from sipo_plugin.training import distributed, loop

    def prepare(accelerator, adapter, optimizer, loader, lr_scheduler):
        optimizer, loader, lr_scheduler = accelerator.prepare(optimizer, loader, lr_scheduler)
        params = [p for m in adapter.trainable_modules() for p in m.parameters() if p.requires_grad]
        backward = accelerator.backward

        def backward_then_average(loss, **kwargs):
            backward(loss, **kwargs)
            if accelerator.sync_gradients:
                for p in params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")

        accelerator.backward = backward_then_average
        return distributed.PreparedTraining(adapter.trainable_modules(), optimizer, loader,
                                            lr_scheduler, params)

    loop.prepare_training = prepare


def local_bytes(tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def model_state_bytes(adapter, optimizer) -> dict[str, int]:
    """Weights, gradients and optimizer states of the trained modules held by this process."""
    params = [p for m in adapter.trainable_modules() for p in m.parameters()]
    states = [v for s in optimizer.state.values() for v in s.values() if hasattr(v, "numel")]
    return {"weights": sum(map(local_bytes, params)),
            "gradients": sum(local_bytes(p) for p in params if p.requires_grad),
            "optimizer": sum(map(local_bytes, states))}


def run_one(name: str, args) -> None:
    """One process of configuration ``name`` (launched by torch.distributed.run)."""
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_training import make_rendered_pairs

    from sipo_plugin.training import loop
    from sipo_plugin.training.config import load_config

    parallelism, finetune = name.split(" / ")
    if parallelism == "hand-made averaging":
        use_hand_made_averaging()
    rank = int(os.environ["RANK"])
    work = CACHE / "ddp_fsdp_runs" / name.replace(" / ", "-").replace(" ", "_")
    config = load_config(None, [
        "--pretrained_model_name_or_path", str(CACHE / "midsize_sd15"),
        "--train_data", str(make_rendered_pairs(CACHE / "pairs", n_pairs=16)),
        "--output_dir", str(work), "--resolution", str(args.resolution), "--objective", "sipo",
        "--kappa", "30.0", "--learning_rate", "1e-5", "--max_train_steps", str(args.steps),
        "--train_batch_size", "1", "--logging_steps", str(args.steps), "--overwrite", "true",
        "--save_precision", "float", *FINETUNES[finetune]])
    memory, wall, cpu = {}, [], []
    original = loop.train_step

    def timed_step(*step_args, **step_kwargs):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = original(*step_args, **step_kwargs)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        bound = inspect.signature(original).bind(*step_args, **step_kwargs).arguments
        memory.update(model_state_bytes(bound["adapter"], bound["optimizer"]))  # untimed
        return out

    loop.train_step = timed_step
    loop.train(config)
    row = {"name": name, "rank": rank, "step_s": statistics.median(wall[2:]),
           "step_cpu_s": statistics.median(cpu[2:]), "peak_rss_mb": peak_rss_mb(),
           **{f"{k}_mb": v / 2**20 for k, v in memory.items()}}
    print("RESULT " + json.dumps(row), flush=True)


def fsdp_environment() -> dict[str, str]:
    """What ``accelerate launch --config_file configs/fsdp2.yaml`` sets (accelerate's code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    args = launch_command_parser().parse_args(
        ["--config_file", str(ROOT / "configs" / "fsdp2.yaml"), "train_sipo.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="per process")
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args)
        return
    build_midsize_sd15(CACHE / "midsize_sd15")
    names = args.only or [f"{p} / {f}" for f in FINETUNES for p in PARALLELISMS]
    rows = {}
    for name in names:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               **(fsdp_environment() if name.startswith("FSDP2") else {})}
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                              "2", "--master_port", str(29500 + len(rows) + 17), __file__,
                              "--one", name, "--steps", str(args.steps), "--resolution",
                              str(args.resolution), "--threads", str(args.threads)],
                             capture_output=True, text=True, env=env)
        results = [json.loads(line.split("RESULT ", 1)[1]) for line in out.stdout.splitlines()
                   if line.startswith("RESULT ")]
        if out.returncode != 0 or len(results) != 2:
            rows[name] = {"skipped": (out.stderr.strip().splitlines() or ["?"])[-1]}
        else:  # the slower process's time, the larger process's memory
            rows[name] = {key: max(r[key] for r in results) for key in results[0]
                          if key not in ("name", "rank")}
        print(json.dumps({"name": name, **rows[name]}), flush=True)
    print(f"\nmid-size SD1.5 architecture, 2 gloo CPU processes x 1 pair at {args.resolution} "
          f"px, {args.steps} steps, {args.threads} thread(s) per process")
    print("| configuration | step wall (s) | step CPU (s) | vs hand-made | weights (MB) | "
          "gradients (MB) | optimizer (MB) | model states vs DDP | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        if "skipped" in r:
            print(f"| {name} | not measured: {r['skipped']} | | | | | | | |")
            continue
        finetune = name.split(" / ")[1]
        old, ddp = rows.get(f"hand-made averaging / {finetune}", {}), rows.get(f"DDP / {finetune}", {})
        states = r["weights_mb"] + r["gradients_mb"] + r["optimizer_mb"]
        ddp_states = (ddp["weights_mb"] + ddp["gradients_mb"] + ddp["optimizer_mb"]
                      if "weights_mb" in ddp else float("nan"))
        print(f"| {name} | {r['step_s']:.2f} | {r['step_cpu_s']:.2f} | "
              f"{r['step_s'] / old.get('step_s', float('nan')):.2f} | {r['weights_mb']:.1f} | "
              f"{r['gradients_mb']:.1f} | {r['optimizer_mb']:.1f} | {states / ddp_states:.2f} | "
              f"{r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
