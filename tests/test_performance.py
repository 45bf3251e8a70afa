"""Performance options: objectives that need no reference run none, per-step overhead out of the
hot path (dtype memo, draws), and the options' equivalences."""

import json

import pytest
import torch

from sipo_plugin.models.base import ModelAdapter
from sipo_plugin.objectives import available_objectives, get_objective
from sipo_plugin.training import reference as reference_module
from sipo_plugin.training.loop import train
from test_training import BUILTIN_OBJECTIVES, load_adapter, short_run


def test_only_sft_declares_that_it_needs_no_reference():
    needs = {name: get_objective(name).needs_reference for name in BUILTIN_OBJECTIVES}
    assert needs == {"diffusion-dpo": True, "dpo-cm": True, "sft": False, "sipo": True}
    assert set(BUILTIN_OBJECTIVES) <= set(available_objectives())


def test_an_objective_without_reference_gets_none_and_one_that_needs_it_refuses_none():
    m = torch.tensor([1.0, 3.0, 2.0, 5.0], requires_grad=True)  # [2B]: winners 1, 3
    t = torch.tensor([10, 20])
    scheduler = object()  # neither objective reads it here
    out = get_objective("sft").from_errors(m, None, t, scheduler)
    assert out.loss.item() == pytest.approx((1.0 + 3.0) / 2)
    assert "mse/ref_w" not in out.metrics and out.metrics["mse/policy_l"] == pytest.approx(3.5)
    with pytest.raises(ValueError, match="needs the reference errors"):
        get_objective("diffusion-dpo").from_errors(m, None, t, scheduler)


@pytest.fixture
def no_reference_allowed(monkeypatch):
    """Any reference forward, frozen copy or cached pre-pass fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the reference was used")
    for cls in (reference_module.AdapterOffReference, reference_module.FrozenCopyReference,
                reference_module.UntrainedModelReference):
        monkeypatch.setattr(cls, "predict", refuse)
    monkeypatch.setattr(ModelAdapter, "frozen_denoiser_copy", refuse)
    monkeypatch.setattr(reference_module, "compute_reference_errors", refuse)


@pytest.mark.parametrize("extra", [(), ("--finetune", "full"),
                                   ("--reference", "cached", "--cache_latents", "true")],
                         ids=["lora", "full", "cached"])
def test_sft_trains_without_any_reference(extra, no_reference_allowed, manifest, tmp_path):
    result = train(short_run(manifest, tmp_path, "--objective", "sft", "--max_train_steps", "2",
                             *extra))
    assert result.steps == 2 and result.reference is None
    assert "train/mse/ref_w" not in result.last_metrics
    assert result.last_metrics["train/loss"] > 0


def test_the_input_dtype_is_read_once_and_again_after_a_cast(manifest, tmp_path, monkeypatch):
    adapter = load_adapter(short_run(manifest, tmp_path))
    unet = adapter.unet
    reads = []
    dtype_of = type(unet).dtype

    def counted(module):
        reads.append(module)
        return dtype_of.fget(module)
    monkeypatch.setattr(type(unet), "dtype", property(counted))
    assert [adapter.input_dtype(unet) for _ in range(3)] == [torch.float32] * 3
    assert len(reads) == 1
    unet.to(torch.bfloat16)
    assert adapter.input_dtype(unet) == torch.bfloat16 and len(reads) == 2


# -- skip_masked_timesteps --------------------------------------------------------------------

def ten_step_scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=10)  # a_t: inf, 11.6, 0.94, 0.49, 0.33, ... (falling)


def test_skipping_the_always_masked_timesteps_keeps_the_expected_loss():
    """One fixed pair (policy = reference errors of 1.0 on both sides) at every timestep of a
    10-step schedule, kappa placed between a_2 and a_3: t = 0, 1, 2 are masked, so t_0 = 3, and
    drawing t from [3, 10) with the loss scaled by 7/10 has the default's expected loss."""
    import math
    from types import SimpleNamespace

    from sipo_plugin.objectives import first_kept_timestep
    from sipo_plugin.objectives.schedule import schedule_error_factor
    from sipo_plugin.training.loop import timestep_share
    scheduler = ten_step_scheduler()
    t_all = torch.arange(10)
    a_t = schedule_error_factor(t_all, scheduler)
    kappa = -math.log(0.9) / math.sqrt(a_t[2].item() * a_t[3].item())
    errors = torch.ones(20)  # [2B]: 10 pairs at t = 0..9, winners then losers
    first = first_kept_timestep(errors, t_all.repeat(2), scheduler, kappa=kappa, mask_threshold=0.9)
    assert first == 3
    assert timestep_share(first, 10) == pytest.approx(0.7)
    for name in ("dpo-cm", "sipo"):
        objective = get_objective(name, kappa=kappa, beta=100.0)

        def loss_at(t: int) -> float:
            m = torch.tensor([1.0, 1.0])  # [2B] winner, loser
            return objective.from_errors(m, m, torch.tensor([t]), scheduler).loss.item()
        losses = [loss_at(t) for t in range(10)]
        assert losses[:3] == [0.0, 0.0, 0.0] and all(x > 0 for x in losses[3:])
        default = sum(losses) / 10  # uniform over t = 0..9
        skipped = timestep_share(first, 10) * sum(losses[first:]) / (10 - first)  # t = 3..9
        assert skipped == pytest.approx(default, rel=1e-12)
    # the draws: only t >= t_0, every one of them, per-pair streams as before
    fake = SimpleNamespace(noise_scheduler=scheduler, first_timestep=first)
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    _, drawn = ModelAdapter.draw_noise_and_timesteps(fake, torch.Size([200, 1]), gens)
    assert set(drawn.tolist()) == set(range(3, 10))


def test_skip_masked_timesteps_trains_from_the_first_kept_timestep(manifest, tmp_path, monkeypatch):
    from sipo_plugin.models.sd15 import SD15Adapter
    seen = []
    make_noisy = SD15Adapter.make_noisy

    def spy(self, latents, noise, timesteps):
        seen.append((self.first_timestep, timesteps.min().item()))
        return make_noisy(self, latents, noise, timesteps)
    monkeypatch.setattr(SD15Adapter, "make_noisy", spy)
    result = train(short_run(manifest, tmp_path, "--objective", "sipo",
                             "--skip_masked_timesteps", "true", "--max_train_steps", "2",
                             "--calibration_pairs", "8", "--target_mask_fraction", "0.25"))
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(e["first_timestep"] for e in events if e.get("event") == "skip_masked_timesteps")
    assert first > 0
    training_draws = [low for level, low in seen if level == first]
    assert len(training_draws) == 2 and min(training_draws) >= first
    assert result.adapter.first_timestep == 0  # evaluation after training draws every timestep


@pytest.mark.parametrize("extra, message", [
    (("--objective", "diffusion-dpo"), "masks pairs by timestep"),
    (("--objective", "sipo", "--weight_model", '"reference"', "--kappa", "3.0"),
     "masks pairs by timestep"),
    (("--objective", "sipo", "--reference", "cached", "--cache_latents", "true"), "cached"),
])
def test_skip_masked_timesteps_config_errors_name_the_fix(extra, message, manifest, tmp_path):
    from sipo_plugin.training.config import ConfigError
    with pytest.raises(ConfigError, match=message):
        short_run(manifest, tmp_path, "--skip_masked_timesteps", "true", *extra)


# -- compile = true ---------------------------------------------------------------------------

# relative, on the logged loss of each of 2 Diffusion-DPO steps (beta 5000): measured 0 at step 1
# and 3.8e-3 at step 2; beta multiplies the float-rounding differences of compiled kernels
COMPILE_TOLERANCE = 1e-2


def lora_after(config):
    from sipo_plugin.training.loop import lora_state
    result = train(config)
    return result, lora_state(result.adapter)


def test_compile_falls_back_to_the_uncompiled_model_with_one_line(manifest, tmp_path, monkeypatch,
                                                                   capsys):
    """A backend that fails on the first call (here: a stand-in for a missing C++ compiler) gives
    one line and the uncompiled run, weight for weight."""
    def failing_compile(module, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler\nmore lines")
        module._compiled_call_impl = fail
    monkeypatch.setattr(torch.nn.Module, "compile", failing_compile)
    common = ("--objective", "diffusion-dpo", "--max_train_steps", "2")
    plain = lora_after(short_run(manifest, tmp_path / "plain", *common))[1]
    capsys.readouterr()
    result, fallen_back = lora_after(short_run(manifest, tmp_path / "c", *common, "--compile", "true"))
    lines = [line for line in capsys.readouterr().out.splitlines() if "compile = true" in line]
    assert lines == ["compile = true: torch.compile failed here (InductorError: no working C++ "
                     "compiler); training uncompiled"]
    assert all(torch.equal(plain[k], fallen_back[k]) for k in plain)
    assert result.adapter.unet._compiled_call_impl is None


def test_compile_where_dynamo_is_unsupported_is_one_line(manifest, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    train(short_run(manifest, tmp_path, "--objective", "sft", "--max_train_steps", "1",
                    "--compile", "true"))
    assert "compile = true: torch.compile is not supported on this platform; training " \
           "uncompiled" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_training_matches_the_uncompiled_run(manifest, tmp_path):
    """torch.compile (inductor, CPU) changes the float summation order only: the losses of 2
    Diffusion-DPO steps agree within COMPILE_TOLERANCE (compiling takes minutes on a busy CPU)."""
    common = ("--objective", "diffusion-dpo", "--max_train_steps", "2", "--logging_steps", "1")
    train(short_run(manifest, tmp_path / "plain", *common))
    compiled = train(short_run(manifest, tmp_path / "c", *common, "--compile", "true"))
    assert compiled.adapter.unet._compiled_call_impl is not None  # it did compile
    losses = [[json.loads(line)["train/loss"] for line in (d / "metrics.jsonl").read_text()
               .splitlines() if '"step"' in line] for d in (tmp_path / "plain", tmp_path / "c")]
    assert len(losses[0]) == 2
    assert losses[1] == pytest.approx(losses[0], rel=COMPILE_TOLERANCE)
