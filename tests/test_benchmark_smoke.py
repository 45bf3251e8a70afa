"""Smoke test of benchmarks/objectives_benchmark.py: one seed, one beta, a few steps, tiny eval."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "objectives_benchmark", ROOT / "benchmarks" / "objectives_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_eval_steps_and_spread(bench):
    assert bench.eval_steps(60, 3) == [20, 40, 60]
    assert bench.eval_steps(5, 1) == [5]
    s = bench.spread([1.0, 3.0, float("nan")])
    assert (s["mean"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 2)
    assert s["std"] == pytest.approx(math.sqrt(2.0))
    assert bench.spread([float("nan")])["n"] == 0


def test_objective_overrides_scale_sft_with_beta(bench):
    args = bench.objective_overrides("sipo-shared-max", 10000.0)
    values = dict(zip(args[::2], args[1::2], strict=True))
    assert values["--objective"] == "sipo"
    assert float(values["--beta"]) == 10000.0 and float(values["--sft_weight"]) == 2.0
    assert json.loads(values["--pair_weight"]) == "shared_max"
    assert bench.objective_overrides("sft", None) == ["--objective", "sft"]
    nosft = dict(zip(*[iter(bench.objective_overrides("sipo-nosft", 3000.0))] * 2, strict=True))
    assert float(nosft["--sft_weight"]) == 0.0


@pytest.mark.slow
def test_benchmark_smoke(bench, tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--workers", "1", "--data", "on_policy", "--seeds", "0",
            "--betas", "5000", "--variants", "sft", "sipo", "--steps", "3", "--batch", "2",
            "--num-pairs", "4", "--eval-samples", "4", "--eval-points", "1",
            "--eval-inference-steps", "2"]
    summary = bench.main(argv)
    runs = tmp_path / "full"
    rows = [json.loads(p.read_text()) for p in sorted((runs / "runs").rglob("seed*.json"))]
    assert {(r["variant"], r["beta"]) for r in rows} == {("sft", None), ("sipo", 5000.0)}
    for r in rows:
        assert len(r["loss_by_step"]) == 3 and all(math.isfinite(x) for x in r["loss_by_step"])
        assert len(r["grad_norm_by_step"]) == 3 and r["grad_norm"]["mean"] > 0
        assert list(r["curve"]) == ["3"] and r["final"]["n_samples"] == 4
        assert not r["nonfinite"]
    sipo = next(r for r in rows if r["variant"] == "sipo")
    assert sipo["objective_hyperparameters"]["sft_weight"] == 1.0
    assert isinstance(sipo["objective_hyperparameters"]["kappa"], float)  # calibrated
    assert {c["variant"] for c in summary["cells"]} == {"sft", "sipo"}
    assert (runs / "reward_curves_on_policy.png").stat().st_size > 0
    assert "| sipo | 5000 |" in (runs / "summary.md").read_text()
    # a second call resumes: the finished runs are read back, not trained again
    mtimes = {p: p.stat().st_mtime_ns for p in (runs / "runs").rglob("seed*.json")}
    capsys.readouterr()
    bench.main(argv)
    assert "2 already done, 0 to run" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime_ns for p in (runs / "runs").rglob("seed*.json")}
