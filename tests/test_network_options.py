"""sd-scripts' network options: clip_skip, save_precision (and their metadata)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from tiny_models import tiny_sd15_components
from tiny_sdxl import tiny_sdxl_components

from sipo_plugin.models.sd15 import SD15Adapter
from sipo_plugin.models.sdxl import SDXLAdapter
from sipo_plugin.training.config import ConfigError, load_config
from sipo_plugin.training.loop import train
from sipo_plugin.training.run import export
from test_training import short_run

PROMPTS = ["a red circle on a gray background", "a blue square"]
CPU = torch.device("cpu")


def test_clip_skip_2_matches_diffusers_encode_prompt_clip_skip_1():
    """sd-scripts / WebUI clip_skip 2 = hidden state -2 through the final layer norm = diffusers'
    encode_prompt(clip_skip=1); clip_skip 1 is the plain last layer."""
    components = tiny_sd15_components()
    skipped = SD15Adapter(dict(components), device=CPU, weight_dtype=torch.float32, clip_skip=2)
    plain = SD15Adapter(dict(components), device=CPU, weight_dtype=torch.float32)
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with torch.no_grad():
        ours = skipped.encode_prompts(PROMPTS)["encoder_hidden_states"]
        theirs, _ = pipe.encode_prompt(PROMPTS, CPU, 1, False, clip_skip=1)
        last = plain.encode_prompts(PROMPTS)["encoder_hidden_states"]
        theirs_last, _ = pipe.encode_prompt(PROMPTS, CPU, 1, False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(last, theirs_last, rtol=0, atol=0)
    assert (ours - last).abs().max() > 1e-3, "clip_skip 2 must read another layer"
    assert skipped.sampling_kwargs() == {"clip_skip": 1} and plain.sampling_kwargs() == {}
    assert skipped.network_metadata(None) == {"ss_clip_skip": "2"}


def test_sdxl_clip_skip_3_matches_diffusers_encode_prompt_clip_skip_1():
    """SDXL reads hidden state -clip_skip of both encoders (default 2, the penultimate, as
    diffusers' encode_prompt(clip_skip=None)); 3 = diffusers' clip_skip=1."""
    components = tiny_sdxl_components()
    pipe = StableDiffusionXLPipeline(**components)
    for ours_skip, their_skip in ((0, None), (3, 1)):
        adapter = SDXLAdapter(dict(components), device=CPU, weight_dtype=torch.float32,
                              clip_skip=ours_skip)
        with torch.no_grad():
            ours = adapter.encode_prompts(PROMPTS)
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device=CPU,
                                                      do_classifier_free_guidance=False,
                                                      clip_skip=their_skip)
        torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=0)
        torch.testing.assert_close(ours["text_embeds"], pooled, rtol=0, atol=0)


def test_clip_skip_bad_values_are_one_line(manifest, tmp_path):
    for args, needle in ((["--clip_skip", "-1"], "'clip_skip' and 'conv_dim' must be >= 0"),
                         (["--family", "sdxl", "--clip_skip", "1"], "penultimate")):
        try:
            short_run(manifest, tmp_path, *args)
        except ConfigError as err:
            assert needle in str(err) and "\n" not in str(err)
        else:
            raise AssertionError(f"{args} accepted")
    components = tiny_sd15_components()
    try:
        SD15Adapter(components, device=CPU, weight_dtype=torch.float32, clip_skip=5)
    except ValueError as err:
        assert "clip_skip = 5: the text encoder has 2 layers" in str(err)
    else:
        raise AssertionError("clip_skip beyond the layer count accepted")


def _predictions(pipe, lora=None, seed=0) -> torch.Tensor:
    """U-Net output of ``pipe`` (with ``lora`` loaded) on one fixed input."""
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    g = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    latents = torch.randn(2, pipe.unet.config.in_channels, size, size, generator=g)
    with torch.no_grad():
        cond, _ = pipe.encode_prompt(PROMPTS, CPU, 1, False)
        return pipe.unet(latents, torch.tensor([500, 20]), cond).sample


def test_fp16_export_halves_the_file_loads_and_records_precision(manifest, tmp_path):
    """save_precision fp16 (the default) writes half the bytes of float, in fp16, and the file
    loads in diffusers with the trained model's predictions up to fp16 rounding."""
    config = short_run(manifest, tmp_path / "run", "--train_text_encoder", "true",
                       "--clip_skip", "2")
    result = train(config)
    files = {}
    for precision in ("fp16", "float", "bf16"):
        cfg = load_config(None, [*_args(manifest, tmp_path / "run"), "--train_text_encoder", "true",
                                 "--clip_skip", "2", "--save_precision", precision,
                                 "--output_name", f"lora_{precision}"])
        files[precision] = export(cfg, result)
    # the tensors take exactly half the bytes; the JSON header (metadata) is the same size
    tensor_bytes = {p: f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little")
                    for p, f in files.items()}
    assert tensor_bytes["fp16"] * 2 == tensor_bytes["float"] == tensor_bytes["bf16"] * 2
    with safe_open(files["float"], "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        with safe_open(files[precision], "pt") as f:
            meta = f.metadata()
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
        assert meta["ss_save_precision"] == precision and meta["ss_clip_skip"] == "2"
    from sipo_plugin.toy.pipeline import load_toy_pipeline
    exact = _predictions(load_toy_pipeline(), files["float"])
    half = _predictions(load_toy_pipeline(), files["fp16"])
    base = _predictions(load_toy_pipeline())
    assert (exact - base).abs().max() > 1e-4, "the LoRA must change the prediction"
    assert (half - exact).abs().max() < 1e-2 * (exact - base).abs().max() + 1e-4


def _args(manifest, output_dir):
    return ["--train_data", str(manifest), "--resolution", "32", "--output_dir", str(output_dir),
            "--max_train_steps", "3", "--train_batch_size", "2", "--learning_rate", "1e-3",
            "--calibration_pairs", "4", "--logging_steps", "1"]
