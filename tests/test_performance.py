"""Performance options: objectives that need no reference run none, per-step overhead out of the
hot path (dtype memo, draws), and the options' equivalences."""

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
