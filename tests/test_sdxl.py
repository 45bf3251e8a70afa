"""SDXL: loading a diffusers folder, conditioning (both encoders, pooled embedding, size/crop time
ids) equal to diffusers' SDXL pipeline, shared noise per pair, a short LoRA training run, and the
LoRA export: sd-scripts keys with the original SGM block names (checked against diffusers' own
SGM -> diffusers converter, for SDXL base's real U-Net layout and the tiny one), and the round
trip through a fresh `StableDiffusionXLPipeline.load_lora_weights` (kohya and diffusers format).

Round-trip tolerance (fp32, CPU): max |difference| <= 1e-5 on outputs of magnitude ~1; the LoRA
itself changes them by > 1e-2, so a lost or mis-scaled module fails.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (_convert_unet_lora_key,
                                                     _maybe_map_sgm_blocks_to_diffusers)
from peft import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_sdxl import (POOLED_DIM, TE1_WIDTH, TE2_WIDTH, diffusers_to_original_sdxl, save_tiny_sdxl,
                       tiny_sdxl_pipeline)
from transformers import CLIPTextModelWithProjection

from sipo_plugin.data.batch import PairBatch
from sipo_plugin.export import export_lora, sgm_block_prefixes, sgm_module_namer, sgm_unet_module_path
from sipo_plugin.models import get_model_adapter
from sipo_plugin.data import Draw, PairDataset, collate_pairs, read_pairs
from sipo_plugin.models.sdxl import SDXLAdapter, batch_time_ids, load_sdxl_components, sdxl_time_ids
from sipo_plugin.training.config import ModelConfig, NetworkConfig, load_config
from sipo_plugin.training.loop import train
from sipo_plugin.training.run import export

PROMPTS = ["a photo of a red cat", "the blue dog"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TOL, MIN_EFFECT = 1e-5, 1e-2
CPU = torch.device("cpu")

# SDXL base 1.0's unet/config.json (the keys that decide module names and shapes).
SDXL_BASE_UNET = {
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True, "sample_size": 128,
}




@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "model")


def load_adapter(model_dir: Path) -> SDXLAdapter:
    return get_model_adapter("sdxl").load(
        ModelConfig(family="sdxl", pretrained_model_name_or_path=str(model_dir)), device=CPU)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Loading and conditioning


def test_loads_the_diffusers_folder_with_a_ddpm_training_scheduler(model_dir):
    adapter = load_adapter(model_dir)
    assert isinstance(adapter.text_encoder_2, CLIPTextModelWithProjection)
    assert adapter.tokenizer_2 is not adapter.tokenizer
    assert type(adapter.noise_scheduler).__name__ == "DDPMScheduler"
    cfg = adapter.noise_scheduler.config  # read from the folder's (Euler) scheduler config
    assert (cfg.beta_schedule, cfg.beta_end, cfg.prediction_type) == ("scaled_linear", 0.012, "epsilon")
    assert adapter.vae.dtype == torch.float32 and adapter.vae_scale_factor == 2
    assert (adapter.base_model_version, adapter.modelspec_architecture) == (
        "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")
    with pytest.raises(ValueError, match="no model_index.json"):
        get_model_adapter("sdxl").load(ModelConfig(family="sdxl", pretrained_model_name_or_path=str(
            model_dir / "unet")), device=CPU)


def test_prompt_conditioning_equals_the_sdxl_pipeline(model_dir):
    adapter = load_adapter(model_dir)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    with torch.no_grad():
        cond = adapter.encode_prompts(PROMPTS)
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device=CPU, do_classifier_free_guidance=False)
    assert cond["encoder_hidden_states"].shape == (2, 77, TE1_WIDTH + TE2_WIDTH)
    assert cond["text_embeds"].shape == (2, POOLED_DIM)
    assert torch.equal(cond["encoder_hidden_states"], embeds)
    assert torch.equal(cond["text_embeds"], pooled)


def test_time_ids_from_sizes_and_crops():
    ids = sdxl_time_ids(torch.tensor([[1024, 768], [600, 800]]), torch.tensor([[0, 128], [32, 0]]),
                        torch.tensor([[1024, 1024], [512, 512]]))
    assert ids.tolist() == [[1024, 768, 0, 128, 1024, 1024], [600, 800, 32, 0, 512, 512]]
    pairs = {"weights": torch.ones(2), "indices": torch.arange(2)}
    batch = PairBatch(pixel_values=torch.zeros(4, 3, 16, 24),
                      extras={"original_sizes": torch.tensor([[40, 60]] * 4)}, **pairs)
    assert batch_time_ids(batch, 8).tolist() == [[40, 60, 0, 0, 16, 24]] * 4  # target, crop fall back
    assert batch_time_ids(PairBatch(pixel_values=torch.zeros(2, 3, 16, 24), **pairs), 8).tolist() == [
        [16, 24, 0, 0, 16, 24]] * 2
    assert batch_time_ids(PairBatch(latents=torch.zeros(2, 4, 8, 12), **pairs), 8).tolist() == [
        [64, 96, 0, 0, 64, 96]] * 2
    with pytest.raises(ValueError, match="one row per image"):
        sdxl_time_ids(torch.zeros(4, 2), torch.zeros(2, 2), torch.zeros(4, 2))


def test_pair_conditioning_matches_the_pipelines_added_conditioning(model_dir):
    """time ids in diffusers' order reach the U-Net, and change its prediction."""
    adapter = load_adapter(model_dir)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    sizes = {"original_sizes": torch.tensor([[20, 24], [16, 16], [40, 32], [16, 16]]),
             "crop_top_lefts": torch.tensor([[2, 4], [0, 0], [12, 8], [0, 0]]),
             "target_sizes": torch.tensor([[16, 16]] * 4)}
    batch = PairBatch(pixel_values=torch.zeros(4, 3, 16, 16), prompts=PROMPTS, extras=sizes,
                      weights=torch.ones(2), indices=torch.arange(2))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([10, 700, 10, 700])
    with torch.no_grad():
        cond = adapter.pair_conditioning(adapter.encode_prompts(PROMPTS), batch)
        pred = adapter.predict(x, t, cond)
        time_ids = torch.cat([pipe._get_add_time_ids(
            tuple(sizes["original_sizes"][i].tolist()), tuple(sizes["crop_top_lefts"][i].tolist()),
            tuple(sizes["target_sizes"][i].tolist()), torch.float32, POOLED_DIM) for i in range(4)])
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device=CPU, do_classifier_free_guidance=False)
        expected = pipe.unet(x, t, torch.cat([embeds, embeds]), added_cond_kwargs={
            "text_embeds": torch.cat([pooled, pooled]), "time_ids": time_ids}).sample
        plain = adapter.predict(x, t, adapter.pair_conditioning(adapter.encode_prompts(PROMPTS),
                                                                dataclasses.replace(batch, extras={})))
    assert torch.equal(cond["time_ids"], time_ids)
    assert max_diff(pred, expected) <= TOL
    assert max_diff(pred[:2], plain[:2]) > MIN_EFFECT  # rows 0, 2 have other sizes than 16x16
    assert max_diff(pred[1], plain[1]) <= TOL  # row 1 is uncropped 16x16, the fallback


def test_time_ids_of_a_collated_batch_are_the_images_sizes_and_crops(model_dir, tmp_path):
    """The data pipeline's sizes reach the U-Net: 16x20 -> resized 16x20, centre crop left 2;
    20x20 -> 16x16, no crop (hand-checked); the other rows are the batch's own values."""
    records = read_pairs(make_pairs(tmp_path / "pairs"))
    dataset = PairDataset(records, 16)
    batch = collate_pairs([dataset[Draw(i, 0)] for i in range(3)])
    time_ids = load_adapter(model_dir).pair_conditioning({}, batch)["time_ids"]
    assert time_ids[:2].tolist() == [[16, 20, 0, 2, 16, 16], [20, 20, 0, 0, 16, 16]]
    assert torch.equal(time_ids[:3], time_ids[3:])  # the loser's images have the winner's sizes here
    assert torch.equal(time_ids, torch.cat([batch.extras["original_sizes"],
                                            batch.extras["crop_top_lefts"],
                                            batch.extras["target_sizes"]], dim=1).float())


def test_winner_and_loser_share_noise_and_timestep(model_dir):
    adapter = load_adapter(model_dir)
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noisy = adapter.noisy_inputs(latents, torch.Generator().manual_seed(2))
    assert torch.equal(noisy.timesteps[:3], noisy.timesteps[3:])
    assert torch.equal(noisy.target[:3], noisy.target[3:])  # epsilon target = the noise
    assert not torch.equal(noisy.target[0], noisy.target[1])


def test_single_file_checkpoint_loads_the_same_weights(tmp_path, hub_offline):
    """An SGM-layout single file (both text encoders, OpenCLIP layout for the second) loads through
    StableDiffusionXLPipeline.from_single_file with a local config folder: bitwise equal weights."""
    pipe = tiny_sdxl_pipeline(0)
    pipe.save_pretrained(tmp_path / "configs")
    checkpoint = diffusers_to_original_sdxl(pipe)
    assert "model.diffusion_model.label_emb.0.0.weight" in checkpoint
    assert "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight" in checkpoint
    save_file(checkpoint, str(tmp_path / "sdxl.safetensors"))
    components = load_sdxl_components(str(tmp_path / "sdxl.safetensors"), str(tmp_path / "configs"))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, loaded = getattr(pipe, name).state_dict(), components[name].state_dict()
        assert expected.keys() == loaded.keys(), name
        assert all(torch.equal(expected[k], loaded[k]) for k in expected), name
    assert type(components["scheduler"]).__name__ == "DDPMScheduler"
    del checkpoint["conditioner.embedders.1.model.positional_embedding"]
    checkpoint["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(77, 32)
    save_file(checkpoint, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad\.safetensors: not an SDXL checkpoint matching the configs"):
        load_sdxl_components(str(tmp_path / "bad.safetensors"), str(tmp_path / "configs"))
    with pytest.raises(ValueError, match=r"set model_config to a local folder .*text_encoder_2/.*"
                                         r"(unet|vae)/"):  # offline, nothing cached
        load_sdxl_components(str(tmp_path / "sdxl.safetensors"))


# ---------------------------------------------------------------------------------------------
# SGM names


def test_sgm_names_for_sdxl_base_invert_with_diffusers_converter():
    """SDXL base's 722 attention-block Linear layers (the sd-scripts LoRA targets) get SGM names
    that diffusers' kohya loader maps back to the same diffusers modules."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
    paths = [name for name, m in unet.named_modules()
             if isinstance(m, torch.nn.Linear) and ".attentions." in name]
    assert len(paths) == 722
    namer = sgm_module_namer(unet.config)
    kohya = {f"lora_unet_{namer(p).replace('.', '_')}.lora_down.weight": p for p in paths}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2.lora_down.weight" in kohya
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0.lora_down.weight" in kohya
    assert "lora_unet_output_blocks_5_1_proj_out.lora_down.weight" in kohya
    assert not any(k.startswith(("lora_unet_input_blocks_1_", "lora_unet_output_blocks_6_")) for k in kohya)
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict.fromkeys(kohya, 0), unet.config)
    # diffusers' intermediate spelling: attn1.processor.to_out_lora.down.weight, ff.net.2.lora.down...
    back = {re.sub(r"\.to_out$", ".to_out.0", re.sub(r"[._]lora\.down\.weight$", "", k))
            for k in (_convert_unet_lora_key(k).replace(".processor", "") for k in mapped)}
    assert back == set(paths)


def test_sgm_names_of_resnets_samplers_and_top_level_modules():
    prefixes = sgm_block_prefixes(SDXL_BASE_UNET)
    cases = {"down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
             "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
             "down_blocks.2.resnets.0.conv_shortcut": "input_blocks.7.0.skip_connection",
             "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
             "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
             "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
             "conv_in": "input_blocks.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "time_embedding.linear_1": "time_embed.0", "conv_out": "out.2"}
    assert {p: sgm_unet_module_path(p, prefixes) for p in cases} == cases
    with pytest.raises(ValueError, match="has no SGM name"):
        sgm_unet_module_path("down_blocks.0.attentions.0.proj_in", prefixes)  # DownBlock2D: none
    with pytest.raises(ValueError, match="int layers_per_block"):
        sgm_block_prefixes({**SDXL_BASE_UNET, "layers_per_block": [2, 2, 2]})


# ---------------------------------------------------------------------------------------------
# LoRA export and the round trip through diffusers


def lora_adapter(model_dir: Path, seed: int = 1) -> SDXLAdapter:
    """The adapter with LoRA on the U-Net and both text encoders, lora_B randomized (alpha != r)."""
    adapter = load_adapter(model_dir)
    adapter.add_lora(NetworkConfig(network_dim=4, network_alpha=3.0, train_text_encoder=True,
                                   network_target_modules=UNET_TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in adapter.trainable_modules():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return adapter


def outputs(adapter: SDXLAdapter) -> dict[str, torch.Tensor]:
    """Text conditioning and U-Net prediction on fixed inputs (non-default sizes)."""
    batch = PairBatch(pixel_values=torch.zeros(4, 3, 16, 16), weights=torch.ones(2),
                      indices=torch.arange(2), extras={
                          "original_sizes": torch.tensor([[20, 24], [16, 16], [20, 24], [16, 16]]),
                          "crop_top_lefts": torch.tensor([[2, 4], [0, 0], [2, 4], [0, 0]])})
    g = torch.Generator().manual_seed(123)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([10, 700, 10, 700])
    with torch.no_grad():
        cond = adapter.pair_conditioning(adapter.encode_prompts(PROMPTS), batch)
        return {**cond, "unet": adapter.predict(x, t, cond)}


def fresh_pipeline_adapter(model_dir: Path, lora_file: Path) -> SDXLAdapter:
    """A new StableDiffusionXLPipeline with the file loaded by diffusers, wrapped as an adapter."""
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(str(lora_file))
    components = {**pipe.components, "scheduler": load_adapter(model_dir).noise_scheduler}
    return SDXLAdapter(components, device=CPU, weight_dtype=torch.float32)


def expected_kohya_names() -> set[str]:
    """sd-scripts names of the tiny U-Net's attention blocks (2 transformer layers each): down
    block 1 (input_blocks 4, 5), the mid block, up block 0 (output_blocks 0-2); 3-layer encoders."""
    names = set()
    for block in ("input_blocks_4_1", "input_blocks_5_1", "middle_block_1",
                  "output_blocks_0_1", "output_blocks_1_1", "output_blocks_2_1"):
        names |= {f"lora_unet_{block}_proj_in", f"lora_unet_{block}_proj_out"}
        for i in range(2):
            base = f"lora_unet_{block}_transformer_blocks_{i}_"
            names |= {base + f"{a}_{m}" for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out_0")}
            names |= {base + "ff_net_0_proj", base + "ff_net_2"}
    for te in ("lora_te1", "lora_te2"):
        for layer in range(3):
            names |= {f"{te}_text_model_encoder_layers_{layer}_{m}" for m in (
                "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                "mlp_fc1", "mlp_fc2")}
    return names


def test_kohya_export_uses_sgm_and_te1_te2_names(model_dir, tmp_path):
    adapter = lora_adapter(model_dir)
    path = adapter.export_lora(tmp_path / "x.safetensors", lora_format="kohya", network_alpha=3.0,
                               metadata={"ss_base_model_version": adapter.base_model_version})
    state = load_file(path)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    assert modules == expected_kohya_names()
    assert len(state) == 3 * len(modules)
    assert state["lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight"].shape == (
        4, TE1_WIDTH + TE2_WIDTH)
    assert state["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"].shape == (TE2_WIDTH, 4)
    assert state["lora_unet_middle_block_1_proj_in.alpha"].item() == 3.0
    # the same names from a get_peft_model_state_dict dict instead of the live module
    from_dict = load_file(export_lora(
        tmp_path / "unet_only.safetensors", unet=get_peft_model_state_dict(adapter.unet),
        network_alpha=3.0, unet_module_name=sgm_module_namer(adapter.unet.config)))
    assert from_dict.keys() == {k for k in state if k.startswith("lora_unet_")}
    assert all(torch.equal(from_dict[k], state[k]) for k in from_dict)


@pytest.mark.parametrize("lora_format", ["kohya", "diffusers"])
def test_exported_lora_reproduces_the_model_in_a_fresh_pipeline(model_dir, tmp_path, lora_format):
    adapter = lora_adapter(model_dir)
    trained = outputs(adapter)
    with adapter.reference():
        base = outputs(adapter)
    suffix = ".safetensors" if lora_format == "kohya" else ""
    path = adapter.export_lora(tmp_path / f"lora{suffix}", lora_format=lora_format, network_alpha=3.0,
                               metadata={})
    if lora_format == "diffusers":
        prefixes = {k.split(".", 1)[0] for k in load_file(path)}
        assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    loaded = outputs(fresh_pipeline_adapter(model_dir, path))
    for key in ("encoder_hidden_states", "text_embeds", "unet"):
        assert max_diff(trained[key], base[key]) > MIN_EFFECT, key
        assert max_diff(loaded[key], trained[key]) <= TOL, key


# ---------------------------------------------------------------------------------------------
# End to end


def make_pairs(folder: Path, n_pairs: int = 4) -> Path:
    """A JSONL manifest of small PNGs of varied sizes; winners are brighter."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(n_pairs):
        for side, level in (("w", 200), ("l", 60)):
            h, w = 16 + 4 * i, 20
            pixels = np.clip(level + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / "img" / f"{i}_{side}.png")
        rows.append({"prompt": PROMPTS[i % 2], "chosen": f"img/{i}_w.png", "rejected": f"img/{i}_l.png"})
    manifest = folder / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.mark.slow
def test_short_sipo_run_trains_and_exports_a_loadable_kohya_lora(model_dir, tmp_path):
    config = load_config(None, [
        "--family", "sdxl", "--pretrained_model_name_or_path", str(model_dir),
        "--train_data", str(make_pairs(tmp_path / "pairs")), "--resolution", "16",
        "--output_dir", str(tmp_path / "run"), "--max_train_steps", "3", "--train_batch_size", "2",
        "--learning_rate", "1e-2", "--calibration_pairs", "4", "--logging_steps", "1",
        "--train_text_encoder", "true", "--objective", "sipo", "--kappa", "auto",
        "--save_precision", "float"])  # the exact round trip; fp16 files: test_network_options
    result = train(config)
    lora_file = export(config, result)
    rows = [json.loads(line) for line in result.metrics_log.read_text().splitlines()]
    logged = [r for r in rows if "step" in r]
    assert [r["step"] for r in logged] == [1, 2, 3] and all(np.isfinite(r["train/loss"]) for r in logged)
    assert isinstance(result.objective.hyperparameters()["kappa"], float)  # 'auto' was calibrated
    state = load_file(lora_file)
    modules = {k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_up.weight")}
    assert all(re.match(r"lora_(unet_(input_blocks|middle_block|output_blocks)_|te1_|te2_)", m)
               for m in modules), modules
    assert {m[:8] for m in modules} == {"lora_une", "lora_te1", "lora_te2"}
    # every LoRA trained, except on the first encoder's last layer: SDXL reads its penultimate
    # hidden states only (the second encoder's last layer feeds the pooled embedding)
    untouched = {m for m in modules if not state[f"{m}.lora_up.weight"].any()}
    assert untouched == {m for m in modules if m.startswith("lora_te1_text_model_encoder_layers_2_")}
    assert len(untouched) == 6
    with safe_open(lora_file, "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    trained, loaded = outputs(result.adapter), outputs(fresh_pipeline_adapter(model_dir, lora_file))
    base = outputs(load_adapter(model_dir))
    for key in ("encoder_hidden_states", "text_embeds", "unet"):
        assert max_diff(trained[key], base[key]) > 0, key
        assert max_diff(loaded[key], trained[key]) <= TOL, key
