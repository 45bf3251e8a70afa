"""LoRA export: sd-scripts key mapping, metadata and hashes, atomic writes, and the round trip
through a fresh diffusers pipeline (`pipe.load_lora_weights`) for the kohya and diffusers formats.

Round-trip tolerance (fp32, CPU): max |difference| <= 1e-5 on U-Net predictions and text-encoder
outputs of magnitude ~1 (measured: 0 for kohya, ~1e-6 for diffusers, where alpha / rank is folded
into lora_B); the LoRA itself changes them by > 1e-2, so a lost or mis-scaled module fails.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors import safe_open
from tiny_models import tiny_sd15_components, tiny_sd15_pipeline

from sipo_plugin.export import (
    DIFFUSERS_WEIGHT_NAME,
    build_metadata,
    export_lora,
    peft_to_diffusers,
    peft_to_kohya,
    sd_scripts_hashes,
)
from sipo_plugin.models.peft_lora import inject_lora
from sipo_plugin.utils import io as sipo_io
from sipo_plugin.utils.io import AtomicWriteError, atomic_write_text, save_safetensors_atomic

UNET_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RANK, ALPHA = 4, 3.0  # alpha != rank: scale 0.75
TOL = 1e-5
MIN_EFFECT = 1e-2
SEED = 0
PROMPTS = ["a photo of a red cat", "the blue dog"]
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()




def add_lora(model: torch.nn.Module, targets, seed: int, **config) -> torch.nn.Module:
    """Inject a LoRA (alpha != rank) and randomize lora_B so that it is non-zero."""
    config = {"r": RANK, "lora_alpha": ALPHA, **config}
    inject_lora(model, LoraConfig(target_modules=targets, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def predict(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-encoder hidden states [2,77,32], U-Net prediction [2,4,8,8]) on fixed inputs."""
    tok = pipe.tokenizer
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        return emb, pipe.unet(x, t, emb).sample


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Key mapping


def test_unet_keys_map_to_sd_scripts_names():
    unet = add_lora(tiny_sd15_components(SEED)["unet"], UNET_TARGETS, seed=1)
    peft_sd = get_peft_model_state_dict(unet)
    kohya = peft_to_kohya(peft_sd, prefix="lora_unet", alpha=ALPHA)
    assert len(kohya) == 3 * len(peft_sd) // 2
    base = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_"
    down = kohya[base + "attn1_to_q.lora_down.weight"]
    up = kohya[base + "attn1_to_q.lora_up.weight"]
    assert down.shape == (RANK, 64) and up.shape == (64, RANK)
    peft_name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(down, peft_sd[f"{peft_name}.lora_A.weight"])
    assert torch.equal(up, peft_sd[f"{peft_name}.lora_B.weight"])
    assert kohya[base + "attn2_to_k.lora_down.weight"].shape == (RANK, 32)  # cross-attention
    assert kohya[base + "attn1_to_out_0.lora_up.weight"].shape == (64, RANK)
    assert kohya[base + "ff_net_0_proj.lora_up.weight"].shape == (512, RANK)  # GEGLU: 2 x 4 x 64
    conv = kohya["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"]
    assert conv.shape == (RANK, 64, 1, 1)  # 1x1 conv kept 4-d, as sd-scripts saves it
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v.alpha" in kohya
    assert "lora_unet_up_blocks_0_attentions_1_proj_out.lora_up.weight" in kohya
    alpha = kohya[base + "attn1_to_q.alpha"]
    assert alpha.ndim == 0 and alpha.dtype == torch.float32 and alpha.item() == ALPHA
    key_re = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(key_re.match(k) for k in kohya), [k for k in kohya if not key_re.match(k)]


def test_text_encoder_keys_use_the_clip_layout():
    te = add_lora(tiny_sd15_components(SEED)["text_encoder"], TE_TARGETS, seed=2)
    peft_sd = get_peft_model_state_dict(te)
    kohya = peft_to_kohya(peft_sd, prefix="lora_te", alpha=ALPHA)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya[f"{name}.lora_down.weight"].shape == (RANK, 32)
    assert kohya[f"{name}.lora_up.weight"].shape == (32, RANK)
    assert kohya["lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight"].shape == (37, RANK)
    assert kohya["lora_te_text_model_encoder_layers_1_mlp_fc2.lora_down.weight"].shape == (RANK, 37)
    assert kohya["lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha"].item() == ALPHA
    assert len(kohya) == 2 * 6 * 3
    # a pre-transformers-5 state dict (with `text_model.`) gives the same names, not doubled
    legacy = {k if k.startswith("text_model.") else f"text_model.{k}": v
              for k, v in peft_sd.items()}
    assert peft_to_kohya(legacy, prefix="lora_te", alpha=ALPHA).keys() == kohya.keys()


def test_diffusers_layout_folds_alpha_into_lora_b():
    unet = add_lora(tiny_sd15_components(SEED)["unet"], ["to_q"], seed=3)
    peft_sd = get_peft_model_state_dict(unet)
    out = peft_to_diffusers(peft_sd, prefix="unet", alpha=ALPHA)
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(out[f"{key}.lora_A.weight"], peft_sd[key[5:] + ".lora_A.weight"])
    expected_b = peft_sd[key[5:] + ".lora_B.weight"] * ALPHA / RANK
    assert torch.allclose(out[f"{key}.lora_B.weight"], expected_b)


@pytest.mark.parametrize(
    "bad_key",
    [
        "conv_in.weight",  # a base weight: not a LoRA key
        "mid_block.attentions.0.proj_in.lora_magnitude_vector",  # DoRA magnitude without its LoRA
        "unet.mid_block.attentions.0.proj_in.lora_A.weight",  # diffusers file layout
    ],
)
def test_unmappable_keys_raise(bad_key):
    good = {"mid_block.attentions.0.proj_out.lora_A.weight": torch.zeros(2, 8),
            "mid_block.attentions.0.proj_out.lora_B.weight": torch.zeros(8, 2)}
    with pytest.raises(ValueError, match="cannot map LoRA key") as info:
        peft_to_kohya({**good, bad_key: torch.zeros(2, 8)}, prefix="lora_unet", alpha=1.0)
    assert bad_key in str(info.value)


def test_unpaired_lora_a_raises():
    with pytest.raises(ValueError, match="no matching lora_B"):
        peft_to_kohya({"a.b.lora_A.weight": torch.zeros(2, 4)}, prefix="lora_unet", alpha=1.0)


def test_export_checks_network_alpha_against_the_model(tmp_path):
    unet = add_lora(tiny_sd15_components(SEED)["unet"], ["to_q"], seed=4)
    with pytest.raises(ValueError, match="network_alpha=5"):
        export_lora(tmp_path / "x.safetensors", unet=unet, network_alpha=5.0)
    with pytest.raises(ValueError, match=".safetensors"):
        export_lora(tmp_path / "x.pt", unet=unet, network_alpha=ALPHA)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Metadata and hashes


def make_metadata(**overrides) -> dict[str, str]:
    """Called the way the trainer calls it."""
    kwargs = dict(
        network_dim=RANK, network_alpha=ALPHA, learning_rate=1e-4, num_train_images=8, steps=10,
        training_started_at=1_700_000_000.5, output_name="tiny", mixed_precision="no", seed=42,
        optimizer="torch.optim.AdamW", lr_scheduler="constant", resolution=32,
        sd_model_name="hub/tiny-sd", prediction_type="epsilon", base_model_version="sd_v1",
        architecture="stable-diffusion-v1/lora",
        extra={"ss_objective": "diffusion_dpo", "ss_objective_beta": 2500.0, "ss_flags": [1, 2]},
    )
    kwargs.update(overrides)
    return build_metadata(**kwargs)


REQUIRED_KEYS = [
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
    "ss_learning_rate", "ss_num_train_images", "ss_steps", "ss_epoch", "ss_training_started_at",
    "ss_training_finished_at", "ss_output_name", "ss_mixed_precision", "ss_seed", "ss_optimizer",
    "ss_lr_scheduler", "ss_resolution", "ss_sd_model_name", "modelspec.sai_model_spec",
    "modelspec.architecture", "modelspec.implementation", "modelspec.title", "modelspec.date",
    "modelspec.resolution", "modelspec.prediction_type",
]


def test_metadata_strings_and_required_keys():
    meta = make_metadata(training_finished_at=1_700_000_100.0)
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    assert not missing
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == ALPHA
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_seed"] == "42"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.resolution"] == "32x32" and meta["ss_resolution"] == "(32, 32)"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.date"].startswith("2023-11-1")
    assert meta["ss_sd_model_name"] == "hub/tiny-sd"
    assert meta["ss_objective"] == "diffusion_dpo" and meta["ss_objective_beta"] == "2500.0"
    assert json.loads(meta["ss_flags"]) == [1, 2]
    assert float(meta["ss_training_finished_at"]) > float(meta["ss_training_started_at"])
    assert make_metadata(prediction_type="v_prediction")["modelspec.prediction_type"] == "v"
    with pytest.raises(ValueError, match="prediction_type"):
        make_metadata(prediction_type="sample")
    with pytest.raises(ValueError, match="reserved"):
        make_metadata(extra={"sshs_model_hash": "x"})


def reference_hashes(tensors, metadata) -> tuple[str, str]:
    """Independent re-implementation of sd-scripts' precalculate_safetensors_hashes."""
    metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = io.BytesIO(safetensors.torch.save(tensors, metadata))
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    model = hashlib.sha256()
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        model.update(chunk)
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[0:8]
    return model.hexdigest(), legacy


def test_hashes_match_sd_scripts_algorithm():
    g = torch.Generator().manual_seed(0)
    big = {"lora_unet_x.lora_down.weight": torch.randn(600, 600, generator=g),  # 1.44 MB
           "lora_unet_x.lora_up.weight": torch.randn(8, 600, generator=g),
           "lora_unet_x.alpha": torch.tensor(3.0)}
    meta = {"ss_a": "1", "modelspec.title": "not hashed"}
    model_hash, legacy_hash = sd_scripts_hashes(big, meta)
    assert (model_hash, legacy_hash) == reference_hashes(big, meta)
    assert legacy_hash != EMPTY_SHA256[:8]  # > 1.1 MB: the legacy window holds data
    assert sd_scripts_hashes(big, {**meta, "modelspec.title": "other"}) == (model_hash, legacy_hash)
    changed = {**big, "lora_unet_x.alpha": torch.tensor(4.0)}
    assert sd_scripts_hashes(changed, meta)[0] != model_hash
    small = {"a": torch.ones(3)}
    assert sd_scripts_hashes(small, {}) == reference_hashes(small, {})
    assert sd_scripts_hashes(small, {})[1] == EMPTY_SHA256[:8]


def test_kohya_file_metadata_and_hashes(tmp_path):
    unet = add_lora(tiny_sd15_components(SEED)["unet"], UNET_TARGETS, seed=5)
    path = export_lora(tmp_path / "lora.safetensors", unet=unet, network_alpha=ALPHA,
                       metadata=make_metadata())
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert all(k in meta for k in REQUIRED_KEYS)
    assert meta["ss_objective"] == "diffusion_dpo"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == reference_hashes(tensors, meta)
    data = path.read_bytes()  # what WebUI re-hashes: the file's tensor section
    header = int.from_bytes(data[:8], "little")
    assert hashlib.sha256(data[8 + header:]).hexdigest() == meta["sshs_model_hash"]
    half = export_lora(tmp_path / "half.safetensors", unet=unet, network_alpha=ALPHA,
                       save_dtype=torch.float16)
    with safe_open(str(half), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert f.metadata()["ss_network_alpha"] == str(ALPHA)


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_write_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert os.listdir(target.parent) == ["out.txt"]
    assert target.stat().st_mode & 0o777 == 0o644


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_fsync_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "lora.safetensors"
    save_safetensors_atomic({"a": torch.ones(2)}, target, {"ss_x": "old"})
    old = target.read_bytes()
    monkeypatch.setattr(sipo_io.os, "fsync", disk_full)
    with pytest.raises(AtomicWriteError) as info:
        save_safetensors_atomic({"a": torch.zeros(1000)}, target, {"ss_x": "new"})
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    assert "No space left" in str(info.value)
    assert isinstance(info.value, OSError)
    assert target.read_bytes() == old
    assert os.listdir(tmp_path) == ["lora.safetensors"]


def test_failure_mid_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "notes.json"
    atomic_write_text(target, "{}")

    def half_then_fail(f, data):
        f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sipo_io, "_write_chunks", half_then_fail)
    with pytest.raises(AtomicWriteError, match="notes.json"):
        atomic_write_text(target, json.dumps({"k": "v" * 1000}))
    assert target.read_text() == "{}"
    assert os.listdir(tmp_path) == ["notes.json"]

    def interrupted(f, data):
        f.write(data[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(sipo_io, "_write_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new")
    assert target.read_text() == "{}" and os.listdir(tmp_path) == ["notes.json"]


def test_export_failure_keeps_previous_lora(tmp_path, monkeypatch):
    unet = add_lora(tiny_sd15_components(SEED)["unet"], ["to_q"], seed=6)
    path = export_lora(tmp_path / "lora.safetensors", unet=unet, network_alpha=ALPHA)
    old = path.read_bytes()
    monkeypatch.setattr(sipo_io.os, "replace", disk_full)
    with pytest.raises(AtomicWriteError, match="lora.safetensors"):
        export_lora(path, unet=unet, network_alpha=ALPHA, metadata={"ss_note": "new"})
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["lora.safetensors"]


# ---------------------------------------------------------------------------------------------
# Round trip: export -> fresh pipeline -> pipe.load_lora_weights -> same predictions


@pytest.fixture(scope="module", params=[False, True], ids=["unet", "unet+text_encoder"])
def trained(request):
    """A pipeline whose U-Net (and text encoder) carry a non-zero LoRA, with its predictions."""
    pipe = tiny_sd15_pipeline(SEED)
    add_lora(pipe.unet, UNET_TARGETS, seed=11)
    if request.param:
        add_lora(pipe.text_encoder, TE_TARGETS, seed=12)
    return pipe, request.param, predict(pipe)


def check_round_trip(path, trained_outputs, with_te: bool) -> None:
    emb_t, eps_t = trained_outputs
    fresh = tiny_sd15_pipeline(SEED)
    emb_0, eps_0 = predict(fresh)
    fresh.load_lora_weights(str(path))
    emb_l, eps_l = predict(fresh)
    assert max_diff(eps_0, eps_t) > MIN_EFFECT  # the LoRA really changes the prediction
    assert max_diff(eps_l, eps_t) <= TOL, max_diff(eps_l, eps_t)
    if with_te:
        assert max_diff(emb_0, emb_t) > MIN_EFFECT
        assert max_diff(emb_l, emb_t) <= TOL, max_diff(emb_l, emb_t)
    else:
        assert torch.equal(emb_l, emb_0)


@pytest.mark.parametrize(
    "fmt, name",
    [
        ("kohya", "lora.safetensors"),
        ("diffusers", "lora_folder"),
        ("diffusers", "lora.safetensors"),
    ],
    ids=["kohya", "diffusers-folder", "diffusers-file"],
)
def test_round_trip(trained, tmp_path, fmt, name):
    pipe, with_te, outputs = trained
    written = export_lora(tmp_path / name, unet=pipe.unet,
                          text_encoder=pipe.text_encoder if with_te else None,
                          network_alpha=ALPHA, format=fmt, metadata=make_metadata())
    expected = tmp_path / name
    if name == "lora_folder":
        expected = expected / DIFFUSERS_WEIGHT_NAME
    assert written == expected and written.is_file()
    with safe_open(str(written), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_objective"] == "diffusion_dpo"
    if fmt == "kohya":
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
        assert any(k.startswith("lora_te_text_model_") for k in keys) == with_te
    else:
        assert all(k.startswith(("unet.", "text_encoder.")) for k in keys)
        assert any(k.startswith("text_encoder.text_model.") for k in keys) == with_te
    check_round_trip(tmp_path / name, outputs, with_te)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_round_trip_per_module_rank_and_alpha(tmp_path, fmt):
    """rank_pattern / alpha_pattern / rsLoRA: exported with each module's own effective alpha."""
    pipe = tiny_sd15_pipeline(SEED)
    add_lora(pipe.unet, UNET_TARGETS, seed=21, rank_pattern={"to_k": 2},
             alpha_pattern={"to_v": 7.0, "ff.net.2": 1.0})
    add_lora(pipe.text_encoder, TE_TARGETS, seed=22, use_rslora=True, alpha_pattern={"fc1": 5.0})
    with pytest.raises(ValueError, match="alpha"):
        export_lora(tmp_path / "x.safetensors", unet=pipe.unet, network_alpha=ALPHA)
    path = export_lora(tmp_path / "lora.safetensors", unet=pipe.unet,
                       text_encoder=pipe.text_encoder, network_alpha=None, format=fmt)
    if fmt == "kohya":
        with safe_open(str(path), "pt") as f:
            alphas = {f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")}
            ranks = {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("lora_down.weight")}
        assert len(alphas) == 2 and ranks == {2, RANK}  # one shared alpha per component
    check_round_trip(path, predict(pipe), with_te=True)


def test_export_from_state_dicts_matches_export_from_modules(tmp_path):
    pipe = tiny_sd15_pipeline(SEED)
    add_lora(pipe.unet, UNET_TARGETS, seed=31)
    add_lora(pipe.text_encoder, TE_TARGETS, seed=32)
    a = export_lora(tmp_path / "a.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder,
                    network_alpha=ALPHA)
    b = export_lora(tmp_path / "b.safetensors", unet=get_peft_model_state_dict(pipe.unet),
                    text_encoder=get_peft_model_state_dict(pipe.text_encoder), network_alpha=ALPHA)
    ta, tb = safetensors.torch.load_file(a), safetensors.torch.load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert fa.metadata() == fb.metadata()  # key order in the header is not (safetensors)
    assert ta["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == ALPHA
