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


# -- what runs without launching processes --

def test_route_through_sends_grad_calls_through_the_wrapper_and_no_grad_calls_past_it():
    import torch

    from sipo_plugin.training.distributed import route_through

    class CountingWrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, x):
            self.calls += 1
            return self.module(x)

    module = torch.nn.Linear(2, 2)
    wrapper = CountingWrapper(module)
    route_through(wrapper, module)
    x = torch.ones(1, 2)
    expected = torch.nn.functional.linear(x, module.weight, module.bias)
    assert torch.equal(module(x), expected) and wrapper.calls == 1  # once: no recursion
    with torch.no_grad():
        assert torch.equal(module(x), expected) and wrapper.calls == 1


def test_fsdp1_and_mid_run_sampling_under_fsdp_are_refused_in_one_line():
    from types import SimpleNamespace

    from sipo_plugin.training.distributed import (DistributedSetupError, check_fsdp_plugin,
                                                  check_fsdp_run)
    with pytest.raises(DistributedSetupError, match="fsdp_version: 2"):
        check_fsdp_plugin(SimpleNamespace(fsdp_version=1))
    check_fsdp_plugin(SimpleNamespace(fsdp_version=2))
    config = SimpleNamespace(training=SimpleNamespace(sample_every_n_steps=5),
                             evaluate=SimpleNamespace(evaluate_every_n_steps=0))
    with pytest.raises(DistributedSetupError, match="sample_every_n_steps"):
        check_fsdp_run(config)
    config.training.sample_every_n_steps = 0
    check_fsdp_run(config)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_parse_and_take_the_preset_values(stage):
    """The shipped configs as ``accelerate launch`` reads them; the "auto" values the trainer
    fills from the preset; a text-encoder LoRA refused (one engine, one module)."""
    from types import SimpleNamespace

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    from sipo_plugin.training.distributed import DistributedSetupError, configure_deepspeed
    args = launch_command_parser().parse_args(
        ["--config_file", str(ROOT / "configs" / f"deepspeed_zero{stage}.yaml"), "train_sipo.py"])
    args = _validate_launch_command(args)[0]
    assert args.use_deepspeed and int(args.zero_stage) == stage and args.num_processes == 2
    assert stage == 2 or args.zero3_save_16bit_model in (True, "true")
    plugin = SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto",
                                               "gradient_clipping": "auto"})
    config = SimpleNamespace(training=SimpleNamespace(train_batch_size=3, max_grad_norm=0.5),
                             network=SimpleNamespace(train_text_encoder=False))
    configure_deepspeed(plugin, config)
    assert plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 3,
                                       "gradient_clipping": 0.5}
    config.network.train_text_encoder = True
    with pytest.raises(DistributedSetupError, match="train_text_encoder"):
        configure_deepspeed(plugin, config)


def test_fsdp2_config_gives_the_processes_fsdp_version_2():
    env = fsdp_environment()
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"


def test_a_sharded_checkpoint_resumes_only_with_its_process_count(tmp_path):
    import torch

    from sipo_plugin.training.checkpoint import CheckpointError, load_checkpoint
    from sipo_plugin.training.sharded import load_shard, save_sharded_checkpoint

    class OneProcess:  # save_sharded_checkpoint's view of accelerate: one process
        process_index, num_processes, is_main_process = 0, 1, True

        def wait_for_everyone(self):
            pass

    optimizer_state = {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.ones(3)}},
                       "param_groups": [{"lr": 1e-3, "params": [0]}]}
    path = save_sharded_checkpoint(tmp_path, 2, trained={"0.w": torch.arange(3.0)},
                                   optimizer_state=optimizer_state,
                                   info={"run_id": "r"}, accelerator=OneProcess())
    assert load_checkpoint(path)["shards"] == 1 and load_checkpoint(path)["lora"] is None
    shard = load_shard(path, 0, 1)
    assert torch.equal(shard["lora"]["0.w"], torch.arange(3.0))
    assert torch.equal(shard["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    with pytest.raises(CheckpointError, match="of 1 processes; resume it with 1 processes"):
        load_shard(path, 0, 2)
