"""Reward registry and built-in rewards, each on a tiny model saved in its real file layout."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel

from sipo_plugin.rewards import (RewardError, available_rewards, build_reward, combine_scores,
                                 describe_rewards, parse_reward_spec, register_reward, zscores)
from sipo_plugin.rewards.registry import ENTRY_POINT_GROUP
from tiny_models import tiny_clip_tokenizer
from tiny_rewards import save_tiny_aesthetic, save_tiny_pickscore, tiny_head_state

PROMPTS = ["a red cat", "the blue dog", "a photo of a cat"]


def _images(n=3, seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def mean_red(images, prompts):
    """A user reward (module:function): mean red value in [0, 1]."""
    return [float(np.asarray(img)[..., 0].mean() / 255) for img in images]


# ---------------------------------------------------------------------------------------------
# Registry


def test_spec_parsing_splits_at_the_first_equals_sign():
    assert parse_reward_spec("colour") == ("colour", None)
    assert parse_reward_spec("pickscore=/m/a=b:c") == ("pickscore", "/m/a=b:c")
    assert parse_reward_spec("my.pkg.mod:fn") == ("my.pkg.mod:fn", None)
    with pytest.raises(RewardError, match="nothing after '='"):
        parse_reward_spec("pickscore=")


def test_registry_lists_builtins_and_validates_names():
    assert {"pickscore", "clip", "aesthetic", "colour", "geometry", "hpsv2",
            "imagereward"} <= set(available_rewards())
    described = describe_rewards()
    assert "[pickscore=PATH]" in described["pickscore"] and "module:function" in described
    with pytest.raises(ValueError, match="lowercase"):
        register_reward(name="Bad_Name", factory=mean_red, description="x")
    with pytest.raises(ValueError, match="already registered"):
        register_reward(name="colour", factory=mean_red, description="x")
    with pytest.raises(RewardError, match="Did you mean 'pickscore'"):
        build_reward("pickscor=/x")


def test_register_reward_as_a_decorator():
    from sipo_plugin.rewards import registry

    @register_reward(name="test-decorated", description="mean red, registered by decorator")
    def factory(path, device):
        return mean_red
    try:
        assert callable(factory) and "test-decorated" in available_rewards()
        img = Image.new("RGB", (2, 2), (255, 0, 0))
        assert build_reward("test-decorated", device="cpu").score([img], ["x"]).tolist() == [1.0]
    finally:
        registry._SPECS.pop("test-decorated")


def test_entry_point_group_is_read(monkeypatch):
    import importlib.metadata
    from sipo_plugin.rewards import registry
    from sipo_plugin.rewards.registry import RewardSpec

    def factory(path, device):
        return mean_red
    spec = RewardSpec("plugin-red", factory, "red from a plugin")

    class EntryPoint:
        name, value = "plugin-red", "plugin:spec"

        def load(self):
            return spec
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [EntryPoint()] if group == ENTRY_POINT_GROUP else [])
    monkeypatch.delitem(registry._SPECS, "plugin-red", raising=False)
    assert "plugin-red" in available_rewards()
    img = Image.new("RGB", (4, 4), (255, 0, 0))
    assert build_reward("plugin-red", device="cpu").score([img], ["x"]).tolist() == [1.0]
    registry._SPECS.pop("plugin-red")


def test_user_function_and_bad_specs_give_one_line():
    reward = build_reward("test_rewards:mean_red", device="cpu")
    img = Image.new("RGB", (4, 4), (51, 0, 0))
    scores = reward.score([img, img], ["a", "b"])
    assert scores.dtype == torch.float32 and scores.tolist() == pytest.approx([0.2, 0.2])
    for spec, message in [("pickscore", "needs its model: --reward pickscore=PATH"),
                          ("colour=/tmp", "takes no model path"),
                          ("no_such_module_xyz:fn", "cannot import module"),
                          ("test_rewards:mean_red=/x", "takes no '=PATH'")]:
        with pytest.raises(RewardError, match=message) as info:
            build_reward(spec, device="cpu")
        assert "\n" not in str(info.value)


def test_score_checks_length_and_finiteness():
    reward = build_reward("test_rewards:mean_red", device="cpu")
    bad = type(reward)(name="bad", spec="bad", fn=lambda images, prompts: [math.nan] * len(images),
                       device=reward.device)
    with pytest.raises(RewardError, match="non-finite"):
        bad.score([Image.new("RGB", (2, 2))], ["x"])
    short = type(reward)(name="short", spec="short", fn=lambda images, prompts: [1.0],
                         device=reward.device)
    with pytest.raises(RewardError, match="returned 1 scores for 2 images"):
        short.score([Image.new("RGB", (2, 2))] * 2, ["x", "y"])


# ---------------------------------------------------------------------------------------------
# Combining and clips


def test_combine_scores_is_the_weighted_sum_of_z_scores_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0])  # mean 2, population std sqrt(2/3)
    b = torch.tensor([10.0, 10.0, 40.0])  # mean 20, population std sqrt(200)
    combined = combine_scores({"a": a, "b": b}, {"b": 0.5})
    # z_a = [-1.224745, 0, 1.224745]; z_b = [-0.707107, -0.707107, 1.414214]
    assert combined.tolist() == pytest.approx([-1.578298, -0.353553, 1.931852], abs=1e-6)
    assert zscores(torch.tensor([5.0, 5.0])).tolist() == [0.0, 0.0]  # constant: no information
    with pytest.raises(ValueError, match="not scored: c"):
        combine_scores({"a": a}, {"c": 1.0})


def test_clip_score_is_the_mean_over_every_kth_frame():
    reward = build_reward("test_rewards:mean_red", device="cpu")
    clip = [Image.new("RGB", (4, 4), (r, 0, 0)) for r in (0, 51, 102, 153, 204, 255)]
    got = reward.score_clips([clip, clip[:1]], ["x", "y"], every_k=2, batch_size=2)
    # frames 0, 2, 4 -> red 0, 102, 204 -> mean 102 / 255 = 0.4; the one-frame clip: 0
    assert got.tolist() == pytest.approx([0.4, 0.0])
    assert reward.score_clips([clip], ["x"], every_k=1).tolist() == pytest.approx([0.5])


# ---------------------------------------------------------------------------------------------
# CLIP rewards on tiny models in their real layouts


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory):
    return save_tiny_pickscore(tmp_path_factory.mktemp("PickScore_v1"))


def _reference_logits(folder, processor_dir, images, prompts):
    """CLIPModel's own forward: logits_per_image = exp(logit_scale) * cos(image, text)."""
    model = CLIPModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(processor_dir)
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image.diagonal(), model.logit_scale.exp().item()


def test_pickscore_and_clip_match_clipmodel_forward(pickscore_dir):
    images = _images()
    logits, scale = _reference_logits(pickscore_dir, pickscore_dir, images, PROMPTS)
    pick = build_reward(f"pickscore={pickscore_dir}", device="cpu").score(images, PROMPTS)
    clip = build_reward(f"clip={pickscore_dir}", device="cpu").score(images, PROMPTS)
    assert scale == pytest.approx(math.exp(2.0))
    torch.testing.assert_close(pick, logits.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clip, (logits / scale).float(), rtol=1e-5, atol=1e-6)
    assert clip.abs().max() <= 1.0


def test_pickscore_reads_its_processor_from_a_subfolder(tmp_path, pickscore_dir):
    folder = save_tiny_pickscore(tmp_path / "pick", processor_subfolder=True)
    assert not (folder / "preprocessor_config.json").exists()
    images = _images(2, seed=3)
    a = build_reward(f"pickscore={folder}", device="cpu").score(images, PROMPTS[:2])
    b = build_reward(f"pickscore={pickscore_dir}", device="cpu").score(images, PROMPTS[:2])
    torch.testing.assert_close(a, b)


def test_missing_or_wrong_reward_folders_name_the_folder(tmp_path):
    text_only = tmp_path / "text_encoder"
    CLIPTextModel(CLIPTextConfig(vocab_size=40, hidden_size=8, intermediate_size=8,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(text_only)
    no_processor = tmp_path / "no_processor"
    save_tiny_pickscore(no_processor)
    for f in no_processor.glob("*"):
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(tmp_path / "missing", "not found"),
             (text_only, "model_type 'clip_text_model'.*needs a CLIP model"),
             (no_processor, "no preprocessor_config.json"),
             (empty, "no config.json")]
    for folder, message in cases:
        with pytest.raises(RewardError, match=message) as info:
            build_reward(f"pickscore={folder}", device="cpu")
        assert str(folder) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Aesthetic predictor


def _hand_aesthetic(clip_dir, state, indices, relu, images):
    """The predictor by hand: normalized projected image embedding through numpy matmuls."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = AutoProcessor.from_pretrained(clip_dir)(images=images, return_tensors="pt")
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels["pixel_values"]).pooler_output
        e = model.visual_projection(pooled).numpy().astype(np.float64)
    x = e / np.linalg.norm(e, axis=1, keepdims=True)
    for n, i in enumerate(indices):
        x = x @ state[f"layers.{i}.weight"].double().numpy().T + state[f"layers.{i}.bias"].double().numpy()
        if relu and n < len(indices) - 1:
            x = np.maximum(x, 0)
    return x[:, 0]


@pytest.mark.parametrize("layout,indices,relu,suffix", [
    ("linear", (0, 2, 4, 6, 7), False, ".pth"),
    ("relu", (0, 3, 6, 9, 11), True, ".safetensors"),
])
def test_aesthetic_matches_a_hand_computation(tmp_path, layout, indices, relu, suffix):
    folder = save_tiny_aesthetic(tmp_path / "aesthetic", layout=layout, suffix=suffix)
    images = _images(3, seed=5)
    expected = _hand_aesthetic(folder / "clip", tiny_head_state(layout), indices, relu, images)
    for spec in (f"aesthetic={folder}", f"aesthetic={folder / f'head-{layout}{suffix}'}"):
        got = build_reward(spec, device="cpu").score(images, PROMPTS)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert expected.std() > 0  # the images are told apart


def test_aesthetic_refuses_pickled_code_and_foreign_heads(tmp_path):
    folder = save_tiny_aesthetic(tmp_path / "a")
    head = folder / "head-linear.pth"
    torch.save(torch.nn.Linear(16, 1), head)  # a pickled module object, not a state dict
    with pytest.raises(RewardError, match="cannot read the aesthetic head as plain tensors"):
        build_reward(f"aesthetic={folder}", device="cpu")
    torch.save({"fc.weight": torch.zeros(1, 16), "fc.bias": torch.zeros(1)}, head)
    with pytest.raises(RewardError, match="not an aesthetic predictor head") as info:
        build_reward(f"aesthetic={folder}", device="cpu")
    assert str(head) in str(info.value)
    torch.save(tiny_head_state(), folder / "second.pth")
    with pytest.raises(RewardError, match="exactly one aesthetic head file"):
        build_reward(f"aesthetic={folder}", device="cpu")


# ---------------------------------------------------------------------------------------------
# Toy rewards and the optional packages


def test_toy_rewards_are_registered_rewards():
    from sipo_plugin.toy.rewards import get_reward
    vivid = np.full((16, 16, 3), 128, np.uint8)
    vivid[4:12, 4:12] = (255, 0, 0)
    dull = np.full((16, 16, 3), 128, np.uint8)
    dull[4:12, 4:12] = (140, 120, 120)
    images = [Image.fromarray(vivid), Image.fromarray(dull)]
    for name in ("colour", "geometry"):
        got = build_reward(name, device="cpu").score(images, ["x", "y"])
        expected = get_reward(name)(np.stack([vivid, dull]), ["x", "y"])
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    colour = build_reward("colour", device="cpu").score(images, ["x", "y"])
    assert colour[0] > colour[1]


@pytest.mark.parametrize("name,package", [("hpsv2", "hpsv2"), ("imagereward", "image-reward")])
def test_optional_package_rewards_say_how_to_install(name, package):
    import importlib.util
    module = {"hpsv2": "hpsv2", "imagereward": "ImageReward"}[name]
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    with pytest.raises(RewardError, match=f"pip install {package}") as info:
        build_reward(name, device="cpu")
    assert "\n" not in str(info.value)


def test_list_rewards_on_both_command_lines(capsys):
    import train_sipo
    from sipo_plugin.pairs.cli import main
    assert train_sipo.main(["--list-rewards"]) == 0
    listed = capsys.readouterr().out
    assert main(["score", "--list-rewards"]) == 0
    assert capsys.readouterr().out == listed
    assert all(name in listed for name in ("pickscore", "aesthetic", "colour", "module:function"))
    json.dumps(listed)
