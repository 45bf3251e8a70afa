"""Latent and text-encoder-output caches: what they hold, reuse on disk, and that a cached batch
trains exactly like a live one given the same VAE posterior sample."""

import dataclasses
import os

import pytest
import torch

from sipo_plugin.data import Draw, read_pairs
from sipo_plugin.data.cache import PromptCache, collate_cached, pair_slots, stack_pair_rows
from sipo_plugin.objectives import get_objective
from sipo_plugin.training.config import ConfigError
from sipo_plugin.training.loop import (PairDraws, lora_state, make_dataloader, seeded_generator,
                                       train, train_step)
from sipo_plugin.training.precompute import LATENT_STREAM, encode_caches
from test_training import Log, load_adapter, short_run


def test_latent_cache_holds_the_seeded_posterior_sample_and_is_reused_on_disk(manifest, tmp_path):
    config = short_run(manifest, tmp_path, "--cache_latents_to_disk", "true",
                       "--cache_text_encoder_outputs", "true")
    records = read_pairs(manifest)
    adapter = load_adapter(config)
    loader = make_dataloader(config, records, total=1)
    log = Log()
    cache = encode_caches(config, adapter, records, tmp_path, log)
    assert any("vae, text_encoder moved to the CPU" in line for line in log.lines)
    batch = loader.collate_fn([loader.dataset[Draw(3, 0)]])
    generators = [seeded_generator(config.training.seed, LATENT_STREAM, 3, side) for side in (0, 1)]
    expected = adapter.encode_images(batch.pixel_values, generators)
    assert torch.equal(cache.latents[3]["latents"], expected)
    with torch.no_grad():
        encoded = adapter.encode_prompts([records[3].prompt])
    cached = cache.prompts.lookup([records[3].prompt])
    assert torch.allclose(cached["encoder_hidden_states"], encoded["encoder_hidden_states"], atol=1e-6)
    files = sorted((tmp_path / "cache" / "latents").glob("*.safetensors"))
    assert len(files) == len(records)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    # a second run reuses every file; an image that changed gets its pair re-encoded
    os.utime(records[0].chosen, ns=(1, 1))
    log = Log()
    encode_caches(config, adapter, records, tmp_path, log)
    assert any(f"({len(records) - 1} reused)" in line for line in log.lines)
    assert [f for f in files if f.stat().st_mtime_ns != stamps[f]] == [files[0]]


def test_a_repeated_pair_is_encoded_and_stored_once(manifest, tmp_path):
    # sd-scripts' num_repeats = 3 lists each pair of a subset three times (data/readers.py)
    config = short_run(manifest, tmp_path, "--cache_latents_to_disk", "true")
    distinct = read_pairs(manifest)
    n, records = len(distinct), distinct * 3
    adapter = load_adapter(config)
    encoded, encode = [], adapter.encode_images

    def counting_encode(pixels, generators):
        encoded.append(pixels.shape[0])
        return encode(pixels, generators)

    adapter.encode_images = counting_encode
    cache = encode_caches(config, adapter, records, tmp_path, Log())
    assert encoded == [2] * n  # one winner + loser encode per distinct pair
    assert len(list((tmp_path / "cache" / "latents").glob("*.safetensors"))) == n
    assert pair_slots(records) == list(range(n)) * 3
    for i in range(n):
        assert torch.equal(cache.latents[i]["latents"], cache.latents[i + 2 * n]["latents"])
    assert not torch.equal(cache.latents[0]["latents"], cache.latents[1]["latents"])
    batch = next(iter(make_dataloader(config, records, total=1, stores=cache)))
    assert batch.latents.shape[0] == 2 * config.training.train_batch_size


def test_cached_batches_have_latents_and_cond_in_the_pair_layout_for_any_latent_rank():
    # video latents [C, F, H, W] per sample: nothing may assume 4-D batches
    items = [{"index": i, "prompt": p, "weight": 1.0,
              "latents": (torch.full((2, 3, 5, 2, 2), float(i))
                          + torch.tensor([0.0, 0.5]).view(2, 1, 1, 1, 1)),
              "extra.original_sizes": torch.tensor([[10 + i, 10], [20 + i, 20]])}
             for i, p in ((0, "a"), (1, "b"), (2, "a"))]
    prompts = PromptCache({"a": {"encoder_hidden_states": torch.zeros(1, 7, 4)},
                           "b": {"encoder_hidden_states": torch.ones(1, 7, 4)}})
    batch = collate_cached(items, base_collate=None, prompts=prompts)
    assert batch.latents.shape == (6, 3, 5, 2, 2)
    assert batch.latents[:, 0, 0, 0, 0].tolist() == [0, 1, 2, 0.5, 1.5, 2.5]  # winners first
    assert batch.extras["original_sizes"][:, 0].tolist() == [10, 11, 12, 20, 21, 22]
    assert batch.cond["encoder_hidden_states"][:, 0, 0].tolist() == [0, 1, 0]
    assert batch.prompts is None and batch.indices.tolist() == [0, 1, 2]
    assert stack_pair_rows([torch.tensor([3]), torch.tensor([4])]).tolist() == [3, 4]


def test_a_cached_batch_trains_exactly_like_a_live_batch_with_the_same_posterior_sample(
        manifest, tmp_path):
    config = short_run(manifest, tmp_path)
    records = read_pairs(manifest)
    live_batch = next(iter(make_dataloader(config, records, total=1)))
    objective = get_objective("diffusion-dpo")
    results = []
    for cached in (False, True):
        adapter = load_adapter(config)
        torch.manual_seed(0)  # the same LoRA init in both runs
        params = adapter.add_trainable(config.network)
        batch = live_batch
        if cached:
            # the cache's sample of the same posterior, and the text encoder's cached outputs
            same_sample = PairDraws.for_batch(7, 0, 0, batch.indices).images
            with torch.no_grad():
                batch = dataclasses.replace(
                    batch, latents=adapter.encode_images(batch.pixel_values, same_sample),
                    pixel_values=None, cond=adapter.encode_prompts(batch.prompts), prompts=None)
        from accelerate import Accelerator
        accelerator = Accelerator(cpu=True)
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        step_draws = PairDraws.for_batch(7, 0, 0, batch.indices)
        metrics = train_step(batch, adapter, objective, accelerator, optimizer, scheduler, params,
                             1.0, step_draws)
        results.append((metrics, lora_state(adapter)))
    (live_metrics, live_state), (cached_metrics, cached_state) = results
    # train_step leaves its metrics on the device (no host sync per step): float() reads them
    assert float(cached_metrics["loss"]) == pytest.approx(float(live_metrics["loss"]), abs=1e-6)
    assert all(torch.allclose(cached_state[k], live_state[k], atol=1e-6) for k in live_state)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in live_state.items() if "lora_B" in k)


@pytest.mark.slow
def test_cached_run_trains_and_reuses_its_disk_cache(manifest, tmp_path):
    common = ["--cache_latents_to_disk", "true", "--cache_text_encoder_outputs", "true",
              "--cache_dir", str(tmp_path / "cache")]
    first = train(short_run(manifest, tmp_path / "a", *common))
    files = sorted((tmp_path / "cache" / "latents").glob("*.safetensors"))
    stamps = [f.stat().st_mtime_ns for f in files]
    second = train(short_run(manifest, tmp_path / "b", *common))
    assert len(files) == 8 and [f.stat().st_mtime_ns for f in files] == stamps  # reused, not rewritten
    a, b = lora_state(first.adapter), lora_state(second.adapter)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)


def test_cache_config_errors(manifest, tmp_path):
    with pytest.raises(ConfigError, match="cache_text_encoder_outputs needs a frozen text encoder"):
        short_run(manifest, tmp_path, "--cache_text_encoder_outputs", "true",
                  "--train_text_encoder", "true")
    with pytest.raises(ConfigError, match="flip_aug cannot be used with cache_latents"):
        short_run(manifest, tmp_path, "--cache_latents", "true", "--flip_aug", "true")


def test_caption_dropout_with_cached_outputs_encodes_the_empty_prompt(manifest, tmp_path):
    config = short_run(manifest, tmp_path, "--cache_text_encoder_outputs", "true",
                       "--cache_latents", "true", "--caption_dropout_rate", "0.5")
    records = read_pairs(manifest)
    adapter = load_adapter(config)
    cache = encode_caches(config, adapter, records, tmp_path, Log())
    assert "" in cache.prompts.rows
    loader = make_dataloader(config, records, total=8, stores=cache)
    dropped = sum(bool((b.cond["encoder_hidden_states"] ==
                        cache.prompts.rows[""]["encoder_hidden_states"]).flatten(1).all(1).any())
                  for b in loader)
    assert 0 < dropped < 8


@pytest.mark.slow
def test_sdxl_cached_batches_keep_the_size_ids_and_train_full_with_a_cached_reference(tmp_path):
    from test_sdxl import make_pairs
    from tiny_sdxl import save_tiny_sdxl
    from sipo_plugin.training.forward import batch_conditioning
    model_dir = save_tiny_sdxl(tmp_path / "model")
    config = load_config_sdxl(model_dir, make_pairs(tmp_path / "pairs"), tmp_path / "run")
    records = read_pairs(config.data.train_data)
    adapter = load_adapter(config)
    cache = encode_caches(config, adapter, records, tmp_path, Log())
    live = next(iter(make_dataloader(config, records, total=1)))
    cached = next(iter(make_dataloader(config, records, total=1, stores=cache)))
    assert torch.equal(live.indices, cached.indices)
    assert live.extras.keys() == cached.extras.keys() == {"original_sizes", "crop_top_lefts",
                                                          "target_sizes"}
    for key in live.extras:
        assert torch.equal(live.extras[key], cached.extras[key]), key
    with torch.no_grad():
        a, b = batch_conditioning(adapter, live), batch_conditioning(adapter, cached)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    result = train(config)
    assert result.steps == 2 and result.reference is None


def load_config_sdxl(model_dir, manifest, output_dir):
    from sipo_plugin.training.config import load_config
    return load_config(None, [
        "--family", "sdxl", "--pretrained_model_name_or_path", str(model_dir),
        "--train_data", str(manifest), "--resolution", "16", "--output_dir", str(output_dir),
        "--max_train_steps", "2", "--train_batch_size", "2", "--calibration_pairs", "4",
        "--finetune", "full", "--reference", "cached", "--cache_latents", "true",
        "--cache_text_encoder_outputs", "true", "--objective", "sipo", "--kappa", "auto"])


class FakeEncoder(torch.nn.Module):
    """Reports its parameters on a device without having one (this machine has no GPU)."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def parameters(self, recurse=True):
        from types import SimpleNamespace
        yield SimpleNamespace(device=torch.device(self.where))

    def to(self, device):
        self.where = str(device)
        return self


def test_released_encoders_leave_the_device_and_come_back_for_sampling():
    from sipo_plugin.models.sd15 import SD15Adapter
    adapter = SD15Adapter.__new__(SD15Adapter)  # only the encoder bookkeeping is exercised
    adapter.device = torch.device("cuda")
    adapter.vae, adapter.text_encoder = FakeEncoder("cuda"), FakeEncoder("cuda")
    assert adapter.release_encoders(vae=True, text_encoders=False) == ["vae"]
    assert (adapter.vae.where, adapter.text_encoder.where) == ("cpu", "cuda")
    with adapter.encoders_on_device():
        assert adapter.vae.where == "cuda"
    assert adapter.vae.where == "cpu"
    adapter.restore_encoders()
    assert adapter.vae.where == "cuda" and adapter.released_encoders == []
    # weights already on the CPU (a CPU run, group offloading) are left alone
    adapter.text_encoder = FakeEncoder("cpu")
    adapter.release_encoders(vae=False, text_encoders=True)
    assert adapter.released_encoders == []


def test_latent_and_reference_caches_share_one_rule_for_the_data_settings(manifest, tmp_path):
    from sipo_plugin.data.cache import data_settings
    from sipo_plugin.training.precompute import reference_settings
    base = short_run(manifest, tmp_path, "--cache_latents", "true", "--reference", "cached")
    # caching and loader options do not change what a pair encodes to: the caches stay valid
    moved = short_run(manifest, tmp_path, "--cache_latents_to_disk", "true", "--reference", "cached",
                      "--cache_dir", str(tmp_path / "elsewhere"), "--dataloader_num_workers", "1")
    resized = short_run(manifest, tmp_path, "--cache_latents", "true", "--reference", "cached",
                        "--resolution", "64")
    assert data_settings(base) == data_settings(moved) != data_settings(resized)
    assert "resolution" in data_settings(base) and "cache_dir" not in data_settings(base)
    records = read_pairs(manifest)
    assert reference_settings(base, records) == reference_settings(moved, records)
    assert reference_settings(base, records) != reference_settings(resized, records)
