"""Data parallel: two CPU processes with B pairs each end with the LoRA of one process with 2B."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_training import make_rendered_pairs

ROOT = Path(__file__).resolve().parents[1]
# Gradients are averaged across processes in another summation order: float rounding only.
TOLERANCE = 5e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_lora(launcher: list[str], out: Path, manifest: Path, batch_size: int, objective: str) -> dict:
    args = ["train_sipo.py", "--train_data", str(manifest), "--resolution", "32",
            "--max_train_steps", "3", "--learning_rate", "1e-3", "--objective", objective,
            "--train_batch_size", str(batch_size), "--output_dir", str(out), "--kappa", "30.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_file(out / "sipo_lora.safetensors")


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_doubled_batch(tmp_path):
    objective = "sipo"  # with a fixed kappa: 'auto' calibrates on each process's own batches
    manifest = make_rendered_pairs(tmp_path / "pairs", n_pairs=8)
    two = train_lora([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                      "--master_port", str(free_port())], tmp_path / "two", manifest, 2, objective)
    one = train_lora([sys.executable], tmp_path / "one", manifest, 4, objective)
    assert one.keys() == two.keys()
    ups = [k for k in one if k.endswith("lora_up.weight")]
    assert max(one[k].abs().max().item() for k in ups) > 10 * TOLERANCE, "the LoRA did not train"
    assert max((one[k] - two[k]).abs().max().item() for k in one) < TOLERANCE
    # only the main process writes outputs: one LoRA, one metrics log
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix == ".safetensors") == \
        ["sipo_lora.safetensors"]
