"""Several processes through accelerate (training/distributed.py): two gloo CPU processes with B
pairs each end with the weights of one process with 2B pairs, with DDP and with FSDP2.

Tolerance: the processes' gradients are averaged in another summation order than one process's
batch mean (float rounding only), as in tests/test_multiprocess.py: 5e-5 on the trained weights
after 3 steps at learning rate 1e-3 (observed about 4e-6).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_multiprocess import free_port
from test_training import make_rendered_pairs

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 5e-5


def two_processes() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port())]


def train(launcher: list[str], out: Path, manifest: Path, batch_size: int, *extra: str,
          env: dict | None = None) -> subprocess.CompletedProcess:
    args = ["train_sipo.py", "--train_data", str(manifest), "--resolution", "32",
            "--max_train_steps", "3", "--learning_rate", "1e-3", "--objective", "sipo",
            "--kappa", "30.0", "--train_batch_size", str(batch_size), "--output_dir", str(out),
            *extra]
    done = subprocess.run([*launcher, *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                             **(env or {})},
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_same_weights(one: dict, two: dict, trained_suffix: str) -> None:
    assert one.keys() == two.keys()
    trained = [k for k in one if k.endswith(trained_suffix)]
    assert trained and max(one[k].abs().max().item() for k in trained) > 10 * TOLERANCE, \
        "the weights did not train"
    assert max((one[k].float() - two[k].float()).abs().max().item() for k in one) < TOLERANCE


@pytest.mark.slow
def test_ddp_accumulates_without_sync_and_trains_the_text_encoder_lora(tmp_path):
    """DDP through accelerate with 2 accumulation micro-batches (no_sync on the first) and a
    text-encoder LoRA read at clip_skip 2 (its last layer's LoRA gets no gradient: DDP must look
    for unused parameters) equals one process with the doubled batch."""
    manifest = make_rendered_pairs(tmp_path / "pairs", n_pairs=8)
    extra = ["--gradient_accumulation_steps", "2", "--train_text_encoder", "true",
             "--clip_skip", "2", "--save_precision", "float"]
    two = train(two_processes(), tmp_path / "two", manifest, 1, *extra)
    train([sys.executable], tmp_path / "one", manifest, 2, *extra)
    one, two_lora = (load_file(tmp_path / d / "sipo_lora.safetensors") for d in ("one", "two"))
    assert any(k.startswith("lora_te_") for k in one)
    assert_same_weights(one, two_lora, "lora_up.weight")
    assert "Expected to have finished reduction" not in two.stderr
