"""Several processes through accelerate (training/distributed.py, training/sharded.py): two gloo
CPU processes with B pairs each end with the weights of one process with 2B pairs, with DDP and
with FSDP2, for a LoRA and for full fine-tuning; a killed FSDP run resumes from its sharded
checkpoint to the same weights.

Tolerance: the processes' gradients are averaged in another summation order than one process's
batch mean (float rounding only), as in tests/test_multiprocess.py: 5e-5 on the trained weights
after 2-3 steps (observed: at most 1.2e-6 for full fine-tuning, LoRA about 4e-6; the sharded
resume is bit-exact).

The trainings of each process group run one after another in one launch
(tests/distributed_runs.py), so the start-up is paid once per group.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_multiprocess import free_port
from test_training import make_rendered_pairs

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 5e-5
BASE_UNET = ROOT / "sipo_plugin" / "toy" / "model" / "unet" / "diffusion_pytorch_model.safetensors"


def fsdp_environment() -> dict[str, str]:
    """The variables ``accelerate launch --config_file configs/fsdp2.yaml`` gives the processes,
    computed by accelerate's own launcher code from the shipped config."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    args = launch_command_parser().parse_args(
        ["--config_file", str(ROOT / "configs" / "fsdp2.yaml"), "train_sipo.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


# name -> (steps, arguments, FSDP or not); per process: 1 pair (two processes) or 2 (one)
RUNS = {
    "ddp-lora": (3, ["--gradient_accumulation_steps", "2", "--train_text_encoder", "true",
                     "--clip_skip", "2"], False),
    "ddp-full": (2, ["--finetune", "full"], False),
    "fsdp-lora": (3, ["--reference", "cached", "--cache_latents", "true"], True),
    "fsdp-full": (2, ["--finetune", "full",
                      "--reference", "frozen_copy"], True),
}
ONE_PROCESS = {"ddp-lora": "ddp-lora", "ddp-full": "full", "fsdp-full": "full",
               "fsdp-lora": "fsdp-lora"}  # the one-process run each is compared with


def run_args(manifest: Path, out: Path, steps: int, batch: int, extra: list[str]) -> list[str]:
    return ["--train_data", str(manifest), "--resolution", "32", "--max_train_steps", str(steps),
            "--learning_rate", "1e-3", "--objective", "sipo", "--kappa", "30.0",
            "--train_batch_size", str(batch), "--output_dir", str(out), "--save_precision",
            "float", *extra]


def launch(processes: int, runs: list[dict], folder: Path) -> list[subprocess.Popen]:
    """``processes`` processes of one group (the variables torchrun would set; started here, so
    a test can kill each of them), running ``runs`` one after another; stderr to a file each."""
    name = f"runs-{len(list(folder.glob('runs-*.json')))}"
    (folder / f"{name}.json").write_text(json.dumps(runs))
    group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
             "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes)}
    started = []
    for rank in range(processes):
        ranks = {**group, "RANK": str(rank), "LOCAL_RANK": str(rank)} if processes > 1 else {}
        with open(folder / f"{name}-{rank}.err", "w") as err:
            started.append(subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "distributed_runs.py"),
                 str(folder / f"{name}.json")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                env={**os.environ, "OMP_NUM_THREADS": "1", **ranks}))
            started[-1].err_file = Path(err.name)
    return started


def finish(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.wait(timeout=600)
        assert process.returncode == 0, process.err_file.read_text()[-3000:]


def trained_weights(out: Path) -> dict:
    lora = out / "sipo_lora.safetensors"
    return load_file(lora if lora.is_file() else
                     out / "sipo_lora" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every two-process run and the one-process runs they are compared with (in parallel)."""
    folder = tmp_path_factory.mktemp("distributed")
    manifest = make_rendered_pairs(folder / "pairs", n_pairs=8)
    fsdp = fsdp_environment()
    two = [{"args": run_args(manifest, folder / name, steps, 1, extra + (
                ["--save_every_n_steps", "1"] if uses_fsdp else [])),
            "env": fsdp if uses_fsdp else {}} for name, (steps, extra, uses_fsdp) in RUNS.items()]
    one = [{"args": run_args(manifest, folder / f"one-{name}", *RUNS[name][:1], 2,
                             RUNS[name][1])}
           for name in sorted(set(ONE_PROCESS.values()) - {"full"})]
    one.append({"args": run_args(manifest, folder / "one-full", *RUNS["ddp-full"][:1], 2,
                                 RUNS["ddp-full"][1])})
    groups = [launch(2, two, folder), launch(1, one, folder)]
    for group in groups:
        finish(group)
    return {"folder": folder, "manifest": manifest, "fsdp": fsdp}


def assert_same_weights(one: dict, two: dict, trained: dict | None = None) -> None:
    """Equal within TOLERANCE, and trained: moved by more than 10 x TOLERANCE from zero (a LoRA's
    up matrices) or from ``trained`` (the base weights of a full fine-tune)."""
    assert one.keys() == two.keys()
    moved = (max(one[k].abs().max().item() for k in one if k.endswith("lora_up.weight"))
             if trained is None else
             max((one[k] - trained[k]).abs().max().item() for k in one))
    assert moved > 10 * TOLERANCE, "the weights did not train"
    assert max((one[k].float() - two[k].float()).abs().max().item() for k in one) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_match_one_process_with_the_doubled_batch(runs, name):
    """ddp-lora: 2 accumulation micro-batches (no_sync on the first) and a text-encoder LoRA read
    at clip_skip 2 (its last layer gets no gradient: DDP looks for unused parameters);
    fsdp-lora: reference = cached; fsdp-full: reference = frozen_copy."""
    one = trained_weights(runs["folder"] / f"one-{ONE_PROCESS[name]}")
    two = trained_weights(runs["folder"] / name)
    assert_same_weights(one, two, None if "lora" in name else load_file(BASE_UNET))
    if name == "ddp-lora":
        assert any(k.startswith("lora_te_") for k in one)


@pytest.mark.slow
def test_fsdp_writes_one_shard_per_process_and_no_step_lora(runs):
    step = runs["folder"] / "fsdp-lora" / "checkpoints" / "step_0000003"
    assert sorted(p.name for p in step.iterdir()) == [
        "checkpoint.json", "optimizer-00000-of-00002.safetensors",
        "optimizer-00001-of-00002.safetensors", "trained-00000-of-00002.safetensors",
        "trained-00001-of-00002.safetensors"]
    assert json.loads((step / "checkpoint.json").read_text())["shards"] == 2
    halves = [load_file(step / f"trained-0000{r}-of-00002.safetensors") for r in (0, 1)]
    assert halves[0].keys() == halves[1].keys()  # every tensor split across the two processes
    full = trained_weights(runs["folder"] / "fsdp-lora")
    assert sum(t.numel() for h in halves for t in h.values()) == sum(
        t.numel() for k, t in full.items() if "lora_" in k and not k.endswith(".alpha"))
    assert not list((runs["folder"] / "fsdp-lora").glob("sipo_lora-*"))


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_from_its_sharded_checkpoint(runs):
    """Killed (SIGKILL to both processes) once its step-1 sharded checkpoint exists, resumed with
    resume = "latest": the same LoRA as one process running the 3 steps at once."""
    folder, out = runs["folder"], runs["folder"] / "killed"
    steps, extra, _ = RUNS["fsdp-lora"]
    run = {"args": run_args(runs["manifest"], out, steps, 1,
                            [*extra, "--save_every_n_steps", "1"]), "env": runs["fsdp"]}
    group = launch(2, [run], folder)
    first = out / "checkpoints" / "step_0000001" / "checkpoint.json"
    deadline = time.monotonic() + 300
    while not first.is_file() and group[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for process in group:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert first.is_file() and not (out / "sipo_lora.safetensors").exists(), \
        group[0].err_file.read_text()[-3000:]
    run["args"] += ["--resume", "latest"]
    finish(launch(2, [run], folder))
    assert_same_weights(trained_weights(folder / "one-fsdp-lora"), trained_weights(out))
