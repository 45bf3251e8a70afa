"""Reference modes: adapter off, frozen copy and cached reference errors agree where they must."""

import json

import pytest
import torch

from sipo_plugin.data.batch import PairBatch
from sipo_plugin.training.forward import batch_conditioning, batch_latents
from sipo_plugin.objectives import get_objective, per_sample_error
from sipo_plugin.training.config import ConfigError, load_config
from sipo_plugin.training.loop import prepare_caches, train
from sipo_plugin.data.cache import draw_index
from sipo_plugin.training.precompute import REFERENCE_FILE
from sipo_plugin.training.reference import (AdapterOffReference, FrozenCopyReference,
                                            pair_generators)
from test_training import (Log, assert_same_trained_weights, load_adapter, short_run,
                           straight_and_resumed)


def perturb_lora(adapter, seed=0):
    """A LoRA that is not a no-op, so adapter-on and adapter-off predictions differ."""
    g = torch.Generator().manual_seed(seed)
    for name, p in adapter.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1


def test_frozen_copy_equals_the_adapter_off_reference(manifest, tmp_path):
    config = short_run(manifest, tmp_path)
    adapter = load_adapter(config)
    copy = FrozenCopyReference(adapter.frozen_denoiser_copy())
    adapter.add_trainable(config.network)
    perturb_lora(adapter)
    latents = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    noisy = adapter.noisy_inputs(latents, torch.Generator().manual_seed(2))
    batch = PairBatch(weights=torch.ones(2), indices=torch.arange(2),
                      prompts=["a red circle", "a blue square"])
    cond = batch_conditioning(adapter, batch)
    with torch.no_grad():
        off = AdapterOffReference().predict(adapter, noisy, cond, batch)
        frozen = copy.predict(adapter, noisy, cond, batch)
        policy = adapter.predict(noisy.noisy, noisy.timesteps, cond)
    assert torch.allclose(off, frozen, atol=1e-6, rtol=0)
    assert not torch.allclose(policy, off, atol=1e-4), "the perturbed LoRA should change the policy"
    assert adapter.unet is not copy.module  # swapped back after the reference prediction


def test_frozen_copy_in_bf16_keeps_its_dtype_and_answers_in_the_policy_device(manifest, tmp_path):
    config = short_run(manifest, tmp_path, "--reference", "frozen_copy", "--reference_dtype", "bf16",
                       "--reference_device", "cpu")
    adapter = load_adapter(config)
    from sipo_plugin.training.reference import make_reference
    reference = make_reference(config, adapter, Log())
    assert next(reference.module.parameters()).dtype == torch.bfloat16
    assert adapter.unet.dtype == torch.float32


def cached_config(manifest, tmp_path, *extra):
    return short_run(manifest, tmp_path, "--reference", "cached", "--cache_latents", "true",
                     "--reference_cache_draws", "3", *extra)


def test_cached_reference_errors_equal_the_live_reference_for_the_same_draws(manifest, tmp_path):
    config = cached_config(manifest, tmp_path, "--objective", "diffusion-dpo")
    adapter = load_adapter(config)
    adapter.add_trainable(config.network)
    from accelerate import Accelerator
    stores = prepare_caches(config, adapter, list_records(config), Accelerator(cpu=True), Log())
    perturb_lora(adapter)  # training moved the policy; the reference must not move
    from sipo_plugin.training.loop import PairDraws, make_dataloader
    loader = make_dataloader(config, list_records(config), total=8, stores=stores)
    objective = get_objective("diffusion-dpo")
    seen_draws = set()
    for position, batch in enumerate(loader):
        draws = pair_generators(batch, PairDraws.for_batch(0, position, 0, batch.indices), 42)
        latents = batch_latents(adapter, batch, None)
        noisy = adapter.noisy_inputs(latents, draws.pairs)
        cond = batch_conditioning(adapter, batch)
        with torch.no_grad():
            live = AdapterOffReference().predict(adapter, noisy, cond, batch)
            policy = adapter.predict(noisy.noisy, noisy.timesteps, cond)
        assert torch.allclose(batch.reference_errors, per_sample_error(live, noisy.target),
                              atol=1e-6, rtol=1e-6)
        cached_loss = objective.from_errors(per_sample_error(policy, noisy.target),
                                            batch.reference_errors, noisy.timesteps,
                                            adapter.noise_scheduler).loss
        live_loss = objective(policy, live, noisy.target, noisy.timesteps, adapter.noise_scheduler).loss
        assert abs(cached_loss.item() - live_loss.item()) <= 1e-6
        seen_draws.update(batch.reference_draw.tolist())
    assert seen_draws == {0, 1, 2}  # 8 batches = 2 epochs of 4: every pair cycles its draws


def list_records(config):
    from sipo_plugin.data import read_pairs
    return read_pairs(config.data.train_data)


def test_draws_cycle_by_epoch():
    assert [draw_index(5, e, 3) for e in range(4)] == [2, 0, 1, 2]


def test_cached_reference_file_is_reused_and_rebuilt_when_settings_change(manifest, tmp_path):
    from accelerate import Accelerator
    records = list_records(cached_config(manifest, tmp_path))
    first = Log()
    config = cached_config(manifest, tmp_path)
    adapter = load_adapter(config)
    adapter.add_trainable(config.network)
    made = prepare_caches(config, adapter, records, Accelerator(cpu=True), first).reference
    again = Log()
    reused = prepare_caches(config, adapter, records, Accelerator(cpu=True), again).reference
    assert any("reused" in line and REFERENCE_FILE in line for line in again.lines)
    assert torch.equal(made.errors, reused.errors)
    more = cached_config(manifest, tmp_path, "--reference_cache_draws", "5")
    rebuilt = prepare_caches(more, adapter, records, Accelerator(cpu=True), Log()).reference
    assert rebuilt.errors.shape == (8, 5, 2)
    assert torch.allclose(rebuilt.errors[:, :3], made.errors, atol=1e-6)  # same seeded draws 0..2


@pytest.mark.parametrize("mode", ["auto", "frozen_copy", "cached"])
def test_kappa_auto_is_calibrated_in_every_reference_mode(mode, manifest, tmp_path):
    extra = ["--cache_latents", "true"] if mode == "cached" else []
    result = train(short_run(manifest, tmp_path, "--reference", mode, "--max_train_steps", "1", *extra))
    rows = [json.loads(line) for line in result.metrics_log.read_text().splitlines()]
    kappa = [r["kappa"] for r in rows if r.get("event") == "calibration"]
    assert len(kappa) == 1 and 0 < kappa[0] < float("inf")
    assert result.objective.hyperparameters()["kappa"] == kappa[0]


def test_auto_and_frozen_copy_calibrate_the_same_kappa_for_lora(manifest, tmp_path):
    kappas = []
    for mode in ("auto", "frozen_copy"):
        result = train(short_run(manifest, tmp_path / mode, "--reference", mode,
                                 "--max_train_steps", "1"))
        kappas.append(result.objective.hyperparameters()["kappa"])
    assert kappas[0] == pytest.approx(kappas[1], rel=1e-6)


@pytest.mark.slow
def test_cached_reference_run_interrupted_then_resumed_ends_with_the_same_lora(manifest, tmp_path):
    straight, resumed = straight_and_resumed(
        manifest, tmp_path, "--max_train_steps", "4", "--gradient_accumulation_steps", "2",
        "--lr_scheduler", "linear", "--save_every_n_steps", "2", "--reference", "cached",
        "--cache_latents_to_disk", "true", "--cache_dir", str(tmp_path / "cache"))
    assert_same_trained_weights(straight, resumed)


def test_config_errors_name_the_fix(manifest, tmp_path):
    with pytest.raises(ConfigError, match="needs cache_latents = true"):
        short_run(manifest, tmp_path, "--reference", "cached")
    with pytest.raises(ConfigError, match="apply to a frozen copy only"):
        short_run(manifest, tmp_path, "--reference_device", "cpu")
    with pytest.raises(ConfigError, match="'reference' must be one of"):
        short_run(manifest, tmp_path, "--reference", "copy")
    with pytest.raises(ConfigError, match="caption_dropout_rate"):
        cached_config(manifest, tmp_path, "--caption_dropout_rate", "0.1")
    load_config(None, ["--train_data", str(manifest), "--finetune", "full", "--reference_dtype",
                       "bf16"])  # full fine-tuning's auto reference is a frozen copy


def test_a_reference_device_that_is_not_there_is_a_config_error(manifest, tmp_path):
    # both used to surface as a traceback from the frozen copy's .to(), after the model loaded
    with pytest.raises(ConfigError, match="'reference_device' = 'cud' is not a device"):
        short_run(manifest, tmp_path, "--reference", "frozen_copy", "--reference_device", "cud")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no cuda device on this machine"):
            short_run(manifest, tmp_path, "--reference", "frozen_copy", "--reference_device", "cuda")
    short_run(manifest, tmp_path, "--reference", "frozen_copy", "--reference_device", "cpu")
