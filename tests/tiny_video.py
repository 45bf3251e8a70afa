"""Tiny CogVideoX components and tiny video pair data, built offline on the CPU in seconds.

`save_tiny_cogvideox(folder, seed)` writes a diffusers folder in the real CogVideoXPipeline layout
(model_index.json, tokenizer/, text_encoder/, transformer/, vae/, scheduler/): a T5 encoder with a
unigram T5 tokenizer, a 1-layer CogVideoXTransformer3DModel (3D RoPE by default, like the 5b
models), an AutoencoderKLCogVideoX with 4 latent channels (4x temporal, 8x spatial compression like
the real one) and the real 2b model's scheduler config (v-prediction, SNR shift 3, zero terminal
SNR). `write_video` / `write_video_pairs` make mp4 clips and frame folders with PyAV and Pillow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                       CogVideoXTransformer3DModel)
from PIL import Image
from transformers import T5Config, T5EncoderModel

from tiny_models import fixed_rng
from tiny_wan import T5_ENCODER_CONFIG, TEXT_DIM, tiny_t5_tokenizer

LATENT_CHANNELS = 4
TEXT_LENGTH = 16  # the real models: 226
# THUDM/CogVideoX-2b scheduler/scheduler_config.json
COGVIDEOX_2B_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, num_train_timesteps=1000,
                              prediction_type="v_prediction", rescale_betas_zero_snr=True,
                              set_alpha_to_one=True, snr_shift_scale=3.0, steps_offset=0,
                              timestep_spacing="trailing")


def tiny_t5_encoder(vocab_size: int) -> T5EncoderModel:
    config = T5Config(vocab_size=vocab_size, num_layers=1, **T5_ENCODER_CONFIG)
    return T5EncoderModel(config).eval()


def tiny_cogvideox_transformer(**overrides) -> CogVideoXTransformer3DModel:
    """sample_height/width 4 latents (32 pixels), 9 frames; 1 layer of 2 heads x 16."""
    config = dict(num_attention_heads=2, attention_head_dim=16, in_channels=LATENT_CHANNELS,
                  out_channels=LATENT_CHANNELS, time_embed_dim=8, text_embed_dim=TEXT_DIM,
                  num_layers=1, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
                  temporal_compression_ratio=4, max_text_seq_length=TEXT_LENGTH,
                  use_rotary_positional_embeddings=True)
    config.update(overrides)
    return CogVideoXTransformer3DModel(**config)


def tiny_cogvideox_vae() -> AutoencoderKLCogVideoX:
    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
        latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4).eval()


def tiny_cogvideox_components(seed: int = 0, **transformer_overrides) -> dict:
    """Weights depend only on `seed`; the caller's global RNG state is left untouched."""
    with fixed_rng(seed):
        tokenizer = tiny_t5_tokenizer()
        return {"tokenizer": tokenizer, "text_encoder": tiny_t5_encoder(len(tokenizer)),
                "vae": tiny_cogvideox_vae(),
                "transformer": tiny_cogvideox_transformer(**transformer_overrides),
                "scheduler": CogVideoXDDIMScheduler(**COGVIDEOX_2B_SCHEDULER)}


def save_tiny_cogvideox(folder: str | Path, seed: int = 0, **transformer_overrides) -> Path:
    """A tiny CogVideoX T2V model saved as a diffusers folder (CogVideoXPipeline.save_pretrained)."""
    folder = Path(folder)
    CogVideoXPipeline(**tiny_cogvideox_components(seed, **transformer_overrides)).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Video data


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """uint8 frames [F, H, W, 3] -> a lossless H.264 file (.mp4) at `fps` (PyAV)."""
    import av
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        stream.options = {"qp": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def moving_square(num_frames: int, height: int, width: int, colour, seed: int) -> np.ndarray:
    """[F, H, W, 3] uint8: a coloured square drifting over a grey background."""
    rng = np.random.default_rng(seed)
    frames = np.full((num_frames, height, width, 3), 96, np.uint8)
    y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
    side = max(2, min(height, width) // 3)
    for i in range(num_frames):
        top, left = (y + i) % (height - side), (x + 2 * i) % (width - side)
        frames[i, top:top + side, left:left + side] = colour
    return frames


def write_frame_folder(folder: str | Path, frames: np.ndarray) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{i:04d}.png")
    return folder


def write_video_pairs(root: str | Path, num_pairs: int = 2, *, num_frames: int = 9,
                      height: int = 32, width: int = 48, fps: int = 8) -> Path:
    """``num_pairs`` mp4 pairs (red square preferred over blue) plus one frame-folder pair, listed
    in ``root/pairs.jsonl`` (paths relative to it); returns the manifest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_pairs):
        chosen = write_video(root / f"w{i}.mp4", moving_square(num_frames, height, width,
                                                               (220, 30, 30), seed=2 * i), fps)
        rejected = write_video(root / f"l{i}.mp4", moving_square(num_frames, height, width,
                                                                 (30, 30, 220), seed=2 * i + 1), fps)
        rows.append({"prompt": "a red square", "chosen": chosen.name, "rejected": rejected.name})
    write_frame_folder(root / "w_frames", moving_square(num_frames, height, width, (220, 30, 30), 99))
    write_frame_folder(root / "l_frames", moving_square(num_frames, height, width, (30, 30, 220), 98))
    rows.append({"prompt": "a red square", "chosen": "w_frames", "rejected": "l_frames",
                 "weight": 2.0})
    manifest = root / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return manifest
