"""The toy world: domain, tokenizer, rewards, fidelity, pairs, evaluator, model, pretraining."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sipo_plugin.toy import domain
from sipo_plugin.toy.evaluate import eval_set, evaluate, save_grid
from sipo_plugin.toy.fidelity import classify, fidelity
from sipo_plugin.toy.rewards import available_rewards, get_reward

GREEN_TRIANGLE = "a green triangle on a black background"
ROOT = Path(__file__).resolve().parents[1]


# --- domain ---------------------------------------------------------------------------------


def test_prompts_parse_and_render():
    prompts = domain.all_prompts()
    assert len(prompts) == len(set(prompts)) == 54
    assert domain.parse_prompt("a red circle on a gray background") == ("red", "circle", "gray")
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        domain.parse_prompt("a red dog on a gray background")
    rng = np.random.default_rng(0)
    img = domain.render("red", "circle", "gray", rng)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    again = domain.render("red", "circle", "gray", np.random.default_rng(0))
    np.testing.assert_array_equal(img, again)


def test_render_jitters_within_a_prompt():
    images = np.stack([domain.render_prompt(GREEN_TRIANGLE, np.random.default_rng(s))
                       for s in range(32)])
    colour = get_reward("colour")(images, [GREEN_TRIANGLE] * 32)
    geometry = get_reward("geometry")(images, [GREEN_TRIANGLE] * 32)
    assert colour.std() > 0.1 and geometry.std() > 0.05


# --- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_one_token_per_word():
    from sipo_plugin.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    for word in domain.vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        assert tok.convert_ids_to_tokens(ids) == [word + "</w>"], word
    ids = tok("a red circle on a gray background", padding="max_length",
              max_length=tok.model_max_length).input_ids
    assert len(ids) == tok.model_max_length == 16
    assert ids[0] == tok.bos_token_id and ids[8] == tok.eos_token_id == tok.pad_token_id
    assert ids[-1] == tok.pad_token_id


# --- rewards and fidelity -------------------------------------------------------------------


def test_colour_reward_prefers_saturated_and_bright():
    rng = np.random.default_rng(1)
    kw = {"size": 8.0, "cx": 16.0, "cy": 16.0}
    dull = domain.render("blue", "square", "gray", rng, saturation=0.4, value=0.7, **kw)
    vivid = domain.render("blue", "square", "gray", rng, saturation=1.0, value=0.95, **kw)
    r = get_reward("colour")(np.stack([dull, vivid]), ["a blue square on a gray background"] * 2)
    assert r[1] > r[0] + 0.4
    assert r[1] == pytest.approx(0.95, abs=0.02) and r[0] == pytest.approx(0.28, abs=0.02)


def test_geometry_reward_prefers_large_centred():
    p = ["a red circle on a white background"] * 3
    big_centre = domain.render("red", "circle", "white", size=11.0, cx=16.0, cy=16.0)
    small_centre = domain.render("red", "circle", "white", size=5.0, cx=16.0, cy=16.0)
    small_corner = domain.render("red", "circle", "white", size=5.0, cx=9.0, cy=9.0)
    g = get_reward("geometry")(np.stack([big_centre, small_centre, small_corner]), p)
    assert g[0] > g[1] > g[2]
    assert get_reward("centred")(small_centre[None], p[:1])[0] > 0.95


def test_rewards_on_empty_image_and_registry():
    blank = np.full((2, 32, 32, 3), 128, np.uint8)
    for name in available_rewards():
        np.testing.assert_array_equal(get_reward(name)(blank, ["x", "y"]), 0.0)
    assert {"colour", "geometry"} <= set(available_rewards())
    from sipo_plugin.toy.rewards import size_reward

    assert get_reward("sipo_plugin.toy.rewards:size_reward") is size_reward  # a user function
    with pytest.raises(ValueError, match="unknown reward 'beauty'; built-ins: "):
        get_reward("beauty")
    with pytest.raises(ValueError, match="cannot import module"):
        get_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="no callable"):
        get_reward("numpy:nothing_here")


def test_fidelity_ground_truth_and_wrong_content():
    images, prompts = domain.render_dataset(540, seed=3)
    assert fidelity(images, prompts).mean() == 1.0
    rng = np.random.default_rng(4)
    wrong_colour = domain.render("blue", "circle", "gray", rng)
    wrong_shape = domain.render("red", "triangle", "gray", rng)
    wrong_bg = domain.render("red", "circle", "white", rng)
    blank = np.full((32, 32, 3), 128, np.uint8)
    batch = np.stack([wrong_colour, wrong_shape, wrong_bg, blank])
    np.testing.assert_array_equal(
        fidelity(batch, ["a red circle on a gray background"] * 4), [0.0, 0.0, 0.0, 0.0]
    )
    assert classify(batch)[:3] == [("blue", "circle", "gray"), ("red", "triangle", "gray"),
                                   ("red", "circle", "white")]


# --- evaluator ------------------------------------------------------------------------------


def test_eval_set_is_fixed_and_covers_prompts():
    prompts, seeds = eval_set(108)
    assert (prompts, seeds) == eval_set(108)
    assert sorted(set(prompts)) == sorted(domain.all_prompts())
    assert all(prompts.count(p) == 2 for p in set(prompts))
    assert eval_set(108, seed=1) != (prompts, seeds)


def test_evaluate_numbers_on_hand_made_images(tmp_path):
    # base: 4 dull squares; tuned: two vivid (win), one equal (tie), one duller (loss)
    def square(sat):
        return domain.render("blue", "square", "gray", size=8.0, cx=16.0, cy=16.0,
                             saturation=sat, value=1.0, hue_shift=0.0)

    base = np.stack([square(0.5)] * 4)
    tuned = np.stack([square(1.0), square(1.0), square(0.5), square(0.4)])
    prompts = ["a blue square on a gray background"] * 4
    m = evaluate(base, tuned, prompts, "colour")
    r_b, r_t = get_reward("colour")(base, prompts), get_reward("colour")(tuned, prompts)
    diff = r_t - r_b
    assert m["n_samples"] == 4 and m["win_rate"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert m["reward_gain"] == pytest.approx(diff.mean()) and m["reward_gain"] > 0.15
    assert m["reward_se"] == pytest.approx(diff.std(ddof=1) / 2)
    assert m["base_reward"] == pytest.approx(r_b.mean()) and m["tuned_fidelity"] == 1.0
    out = save_grid(base, tuned, tmp_path / "grid.png", n=3)
    from PIL import Image

    assert Image.open(out).size == (3 * 32 * 4, 2 * 32 * 4)


# --- the bundled model, sampling, pairs, pretraining ----------------------------------------


@pytest.fixture(scope="module")
def pipe():
    from sipo_plugin.toy.pipeline import load_toy_pipeline

    return load_toy_pipeline()


def test_bundled_model_loads_per_component_and_is_small():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from sipo_plugin.toy.pipeline import TOY_MODEL_DIR

    size = sum(f.stat().st_size for f in TOY_MODEL_DIR.rglob("*") if f.is_file())
    assert size < 10 * 2**20
    unet = UNet2DConditionModel.from_pretrained(TOY_MODEL_DIR, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(TOY_MODEL_DIR, subfolder="vae")
    te = CLIPTextModel.from_pretrained(TOY_MODEL_DIR, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(TOY_MODEL_DIR, subfolder="tokenizer")
    assert unet.config.cross_attention_dim == te.config.hidden_size
    assert vae.config.latent_channels == unet.config.in_channels == 4
    assert 0.2 < vae.config.scaling_factor < 5.0
    assert tok("a cyan square on a white background").input_ids == tok.convert_tokens_to_ids(
        ["<|startoftext|>", "a</w>", "cyan</w>", "square</w>", "on</w>", "a</w>", "white</w>",
         "background</w>", "<|endoftext|>"])
    assert (TOY_MODEL_DIR / "tokenizer" / "vocab.json").is_file()
    assert (TOY_MODEL_DIR / "tokenizer" / "merges.txt").is_file()


def test_sampling_is_deterministic_per_prompt_and_seed(pipe):
    from sipo_plugin.models.peft_lora import inject_lora, set_lora_enabled
    from sipo_plugin.toy.pipeline import sample_images

    prompts = ["a red circle on a gray background", GREEN_TRIANGLE, GREEN_TRIANGLE]
    kw = {"num_inference_steps": 8}
    images = sample_images(pipe, prompts, [1, 2, 3], **kw)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    alone = sample_images(pipe, prompts[1:2], [2], **kw)
    other_batch = sample_images(pipe, [prompts[1], prompts[0]], [2, 9], batch_size=1, **kw)
    assert np.abs(alone[0].astype(int) - images[1]).max() <= 1
    assert np.abs(other_batch[0].astype(int) - images[1]).max() <= 1
    assert np.abs(images[1].astype(int) - images[2]).max() > 10  # another seed, another image


def test_sampling_with_a_lora_adapter(pipe):
    import copy

    from peft import LoraConfig

    from sipo_plugin.models.peft_lora import inject_lora, set_lora_enabled
    from sipo_plugin.toy.pipeline import sample_images

    tuned = copy.copy(pipe)
    tuned.unet = copy.deepcopy(pipe.unet)
    inject_lora(tuned.unet, LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights=False))
    p, s = [GREEN_TRIANGLE] * 2, [5, 6]
    base = sample_images(pipe, p, s, num_inference_steps=6)
    with_lora = sample_images(tuned, p, s, num_inference_steps=6)
    set_lora_enabled(tuned.unet, False)
    disabled = sample_images(tuned, p, s, num_inference_steps=6)
    np.testing.assert_array_equal(disabled, base)
    assert np.abs(with_lora.astype(int) - base).max() > 0


def test_toy_pairs_come_through_the_pairs_path(pipe, tmp_path):
    """[pairs] on the toy model: sample -> score (colour) -> make, the same functions as
    `sipo-pairs`; the candidates are the toy sampler's images for their seeds; resumable."""
    from PIL import Image

    from sipo_plugin.pairs.candidates import read_candidates
    from sipo_plugin.pairs.onpolicy import make_training_pairs
    from sipo_plugin.toy.pipeline import sample_images
    from sipo_plugin.training.config import load_config

    config = load_config(ROOT / "presets" / "demo.toml", [
        "--train_data", str(tmp_path / "pairs.jsonl"), "--candidates_dir", str(tmp_path / "c"),
        "--num_prompts", "6", "--sampler_steps", "4", "--output_dir", str(tmp_path)])
    manifest = make_training_pairs(config)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 6  # best vs worst of 2 candidates for each of 6 prompt slots
    for row in rows:
        assert row["chosen_scores"]["colour"] > row["rejected_scores"]["colour"]
        img = np.asarray(Image.open(manifest.parent / row["chosen"]))
        assert img.shape == (32, 32, 3)
        assert get_reward("colour")(img[None], [row["prompt"]])[0] == pytest.approx(
            row["chosen_scores"]["colour"], abs=1e-6)
    first = read_candidates(tmp_path / "c")[0]
    toy = sample_images(pipe, [first.prompt], [first.seed], num_inference_steps=4,
                        guidance_scale=3.0)[0]
    drawn = np.asarray(Image.open(tmp_path / "c" / first.path)).astype(int)
    assert np.abs(drawn - toy).max() <= 1  # the toy's own DDIM sampler, the same seed
    before = manifest.read_text()
    stamp = (tmp_path / "c" / first.path).stat().st_mtime_ns
    assert make_training_pairs(config).read_text() == before  # resumed: nothing re-sampled
    assert (tmp_path / "c" / first.path).stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_quick_pretrain_writes_a_loadable_pipeline(tmp_path):
    from sipo_plugin.toy.pipeline import load_toy_pipeline, sample_images
    from sipo_plugin.toy.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(out=str(tmp_path / "m"), n_images=32, vae_steps=2, vae_batch=4,
                         unet_steps=2, unet_batch=4, warmup=1)
    lines = []
    out = pretrain(cfg, log=lines.append)
    assert any(line.startswith("vae ") for line in lines) and "scaling_factor" in " ".join(lines)
    pipe = load_toy_pipeline(out)
    assert pipe.vae.config.scaling_factor != 1.0
    images = sample_images(pipe, [GREEN_TRIANGLE], [0], num_inference_steps=2)
    assert images.shape == (1, 32, 32, 3)
    info = json.loads((out / "toy_pretrain.json").read_text())
    assert info["config"]["vae_steps"] == 2
