"""One forward path (issue 13): the calibration hook an objective declares, the reference the
analysis shares with the trainer, and an objective step that never reads the device."""

import dataclasses
import json

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from sipo_plugin.objectives import (CalibrationSample, LossOutput, get_objective,
                                    register_objective)
from sipo_plugin.objectives import registry
from sipo_plugin.training.loop import train
from test_training import short_run


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))


@dataclasses.dataclass(frozen=True)
class ScaledConfig:
    scale: float | str = "auto"


def scaled_dpo(pairs, config):
    """scale * ((m_w - r_w) - (m_l - r_l)): a plugin objective whose scale is calibrated."""
    gap = (pairs.policy_err_w - pairs.ref_err_w) - (pairs.policy_err_l - pairs.ref_err_l)
    return LossOutput(config.scale * gap, {"scale": float(config.scale)})


def test_a_plugin_objectives_calibration_hook_is_called_by_the_trainer(
        isolated_registry, manifest, tmp_path):
    """The trainer computes the calibration sample (calibration_pairs = 4 pairs: 8 reference
    errors and their timesteps), calls the hook once, trains and stores what it returned."""
    calls = []

    def calibrate(config, sample, scheduler):
        calls.append(sample)
        errors = torch.cat(sample.errors)
        return dataclasses.replace(config, scale=1.0 / float(errors.mean()))

    register_objective(name="scaled-dpo", fn=scaled_dpo, config_cls=ScaledConfig,
                       calibrate=calibrate, needs_calibration=lambda c: c.scale == "auto")
    result = train(short_run(manifest, tmp_path, "--objective", "scaled-dpo",
                             "--max_train_steps", "1"))
    assert len(calls) == 1
    sample = calls[0]
    assert isinstance(sample, CalibrationSample)
    errors, timesteps = torch.cat(sample.errors), torch.cat(sample.timesteps)
    assert errors.shape == (8,) and timesteps.shape == (8,)
    for t in sample.timesteps:  # per batch [2B]: winners, then losers, sharing the timestep
        assert torch.equal(t[:len(t) // 2], t[len(t) // 2:])
    assert torch.all(errors > 0)
    scale = 1.0 / float(errors.mean())
    assert result.objective.config.scale == scale
    rows = [json.loads(line) for line in result.metrics_log.read_text().splitlines()]
    assert [r["scale"] for r in rows if r.get("event") == "calibration"] == [scale]
    assert rows[-1]["train/scale"] == pytest.approx(scale)  # the objective trained with it


def test_the_calibration_hook_is_skipped_when_not_needed_and_its_result_checked(isolated_registry):
    sample = CalibrationSample([torch.tensor([1.0, 2.0])], [torch.tensor([10])])
    register_objective(name="scaled-dpo", fn=scaled_dpo, config_cls=ScaledConfig,
                       calibrate=lambda config, s, scheduler: dataclasses.replace(config, scale=2.0),
                       needs_calibration=lambda c: c.scale == "auto")
    fixed = get_objective("scaled-dpo", scale=3.0)
    assert not fixed.needs_calibration and fixed.calibrate(sample, None) is fixed
    auto = get_objective("scaled-dpo")
    assert auto.needs_calibration and auto.calibrate(sample, None).config.scale == 2.0
    register_objective(name="bad-hook", fn=scaled_dpo, config_cls=ScaledConfig,
                       calibrate=lambda config, s, scheduler: {"scale": 2.0})
    with pytest.raises(TypeError, match="must return a ScaledConfig"):
        get_objective("bad-hook").calibrate(sample, None)
    with pytest.raises(TypeError, match="calibrate of objective 'worse' must be callable"):
        register_objective(name="worse", fn=scaled_dpo, config_cls=ScaledConfig, calibrate=3)
    assert not get_objective("diffusion-dpo").needs_calibration


@pytest.mark.parametrize("name", ["sipo", "dpo-cm"])
def test_kappa_auto_is_the_calibration_hook_of_the_weighted_objectives(name):
    from sipo_plugin.objectives import calibrate_kappa
    scheduler = DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    errors, timesteps = [torch.rand(16, generator=g)], [torch.randint(1, 1000, (8,), generator=g)]
    objective = get_objective(name, target_mask_fraction=0.25)
    calibrated = objective.calibrate((errors, timesteps), scheduler)
    assert calibrated.config.kappa == calibrate_kappa(errors, timesteps, scheduler,
                                                      mask_threshold=0.9, target_mask_fraction=0.25)
    assert calibrated.hyperparameters() == {**objective.hyperparameters(),
                                            "kappa": calibrated.config.kappa}


@pytest.mark.parametrize("name", ["diffusion-dpo", "dpo-cm", "sipo", "sft"])
@pytest.mark.parametrize("scheduler", [DDPMScheduler(), FlowMatchEulerDiscreteScheduler()],
                         ids=["ddpm", "flow"])
def test_an_objective_step_reads_nothing_back_from_the_device(name, scheduler):
    """The step's objective call on "meta" tensors (no values: any host read raises) runs, so
    on an accelerator it queues work without waiting for it: no .item(), .tolist(), bool()."""
    objective = get_objective(name, **({"kappa": 30.0} if name in ("dpo-cm", "sipo") else {}))
    policy = torch.rand(8, device="meta", requires_grad=True)
    reference = torch.rand(8, device="meta")
    integer = not isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    t = torch.empty(4, device="meta", dtype=torch.long if integer else torch.float32)
    out = objective.from_errors_on_device(policy, reference, t, scheduler)
    assert out.loss.device.type == "meta" and out.loss.shape == ()
    if name != "sft":
        buckets = sorted(k for k in out.metrics if k.startswith("weights_by_t/"))
        assert len(buckets) == (10 if name in ("dpo-cm", "sipo") else 0)


def test_empty_timestep_buckets_are_nan_on_the_device_and_left_out_of_from_errors():
    """A batch at t = 5 and 450: the bucket means of the other eight tenths are NaN in the
    step's metrics (the logger leaves non-finite values out) and absent from from_errors."""
    objective = get_objective("sipo", kappa=50.0)
    m = torch.tensor([0.1, 0.2, 0.3, 0.4])  # [2B]: winners 0.1, 0.2
    t = torch.tensor([5, 450])
    on_device = objective.from_errors_on_device(m, m, t, DDPMScheduler()).metrics
    assert torch.isnan(on_device["weights_by_t/100-199"])
    assert torch.isfinite(on_device["weights_by_t/000-099"])
    floats = objective.from_errors(m, m, t, DDPMScheduler()).metrics
    assert sorted(k for k in floats if k.startswith("weights_by_t/")) == [
        "weights_by_t/000-099", "weights_by_t/400-499"]
    assert floats["weights_by_t/400-499"] == pytest.approx(float(on_device["weights_by_t/400-499"]))


@pytest.mark.parametrize("mode, expected", [
    (("--reference", "frozen_copy", "--reference_dtype", "bf16"), ("FrozenCopyReference", torch.bfloat16)),
    (("--reference", "cached", "--cache_latents", "true"), ("AdapterOffReference", None)),
    (("--finetune", "full", "--reference", "cached", "--cache_latents", "true"),
     ("FrozenCopyReference", torch.float32)),
])
def test_analyze_uses_the_runs_reference(mode, expected, manifest, tmp_path):
    """--analyze chooses the reference where the trainer does (reference_dtype kept); a cached
    reference becomes the model its pre-pass ran (the analysis draws its own timesteps)."""
    from sipo_plugin.analysis.collect import load_for_analysis
    _, _, reference, _ = load_for_analysis(short_run(manifest, tmp_path, *mode))
    assert type(reference).__name__ == expected[0]
    if expected[1] is not None:
        assert next(reference.module.parameters()).dtype == expected[1]


def test_the_readme_plugin_example_registers_a_working_hook(isolated_registry):
    import re
    from pathlib import Path
    heading = "### Plugin objectives: the reference and the calibration hook"
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text[text.index(heading):], flags=re.DOTALL).group(1)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme_plugin__"})
    objective = get_objective("scaled-dpo")
    calibrated = objective.calibrate(([torch.tensor([1.0, 3.0, 2.0, 2.0])], [torch.tensor([5, 9])]),
                                     DDPMScheduler())
    assert objective.needs_calibration and calibrated.config.scale == 0.5
    m = torch.tensor([1.0, 2.0])
    assert calibrated.from_errors(m, torch.zeros(2), torch.tensor([5]), DDPMScheduler()).loss.item() \
        == pytest.approx(0.5 * (1.0 - 2.0))
