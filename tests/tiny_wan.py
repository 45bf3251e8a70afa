"""Tiny Wan2.1-architecture components built from config (offline, CPU, seconds).

`save_tiny_wan(folder, seed)` writes a diffusers folder in the real WanPipeline layout
(model_index.json, tokenizer/, text_encoder/, transformer/, vae/, scheduler/): a UMT5 encoder with a
T5 (unigram) tokenizer, a 2-layer WanTransformer3DModel, an AutoencoderKLWan with 4 latent channels
(4x temporal, 8x spatial compression like the real one) and the real model's sampling scheduler
(UniPC with flow sigmas, flow_shift 3.0). Weights depend only on `seed`; the caller's global RNG
state is left untouched.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from tiny_models import fixed_rng

TEXT_DIM = 32
LATENT_CHANNELS = 4
# the tiny T5-family text encoders (Wan's UMT5, CogVideoX's T5) but for their depth
T5_ENCODER_CONFIG = dict(d_model=TEXT_DIM, d_kv=8, d_ff=37, num_heads=4,
                         relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                         eos_token_id=1)
# per-channel statistics different from (0, 1), so that normalization is visible in tests
LATENTS_MEAN = [0.1, -0.2, 0.3, -0.4]
LATENTS_STD = [1.5, 0.5, 2.0, 0.8]
_PIECES = ("▁a", "▁an", "▁the", "▁cat", "▁dog", "▁red", "▁blue", "▁video", "▁of", "▁running",
           "▁", "a", "e", "o", "t", "s", "n", "r")


def tiny_t5_tokenizer() -> T5Tokenizer:
    """Unigram T5 tokenizer (pad 0, eos 1, unk 2) over a few whole words and letters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, -float(i + 1)) for i, piece in enumerate(_PIECES)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_umt5_encoder(vocab_size: int) -> UMT5EncoderModel:
    config = UMT5Config(vocab_size=vocab_size, num_layers=2, **T5_ENCODER_CONFIG)
    return UMT5EncoderModel(config).eval()


def tiny_wan_transformer(**overrides) -> WanTransformer3DModel:
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                  in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM,
                  freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    config.update(overrides)
    return WanTransformer3DModel(**config)


def tiny_wan_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(base_dim=3, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1],
                            num_res_blocks=1, temperal_downsample=[False, True, True],
                            latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD).eval()


def tiny_wan_scheduler() -> UniPCMultistepScheduler:
    """What the real Wan2.1 diffusers folders ship for sampling (flow_shift 3.0 at 480p)."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=3.0)


def tiny_wan_components(seed: int = 0, **transformer_overrides) -> dict:
    with fixed_rng(seed):
        tokenizer = tiny_t5_tokenizer()
        return {"tokenizer": tokenizer, "text_encoder": tiny_umt5_encoder(len(tokenizer)),
                "vae": tiny_wan_vae(), "transformer": tiny_wan_transformer(**transformer_overrides),
                "scheduler": tiny_wan_scheduler()}


def tiny_wan_pipeline(seed: int = 0, **transformer_overrides) -> WanPipeline:
    return WanPipeline(**tiny_wan_components(seed, **transformer_overrides))


def save_tiny_wan(folder: str | Path, seed: int = 0, **transformer_overrides) -> Path:
    """A tiny Wan2.1 T2V model saved as a diffusers folder (WanPipeline.save_pretrained)."""
    folder = Path(folder)
    tiny_wan_pipeline(seed, **transformer_overrides).save_pretrained(folder)
    return folder
