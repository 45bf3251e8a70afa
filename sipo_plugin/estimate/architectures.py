"""The published SD1.5 and SDXL architectures, typed in from diffusers' / transformers' config files
(stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder*/config.json), so
`--estimate` and benchmarks/gpu_check.py can build them without reading or downloading anything.

Only the keys that differ from the classes' defaults are written; the parameter counts are the
published models' (SD1.5 U-Net 859,520,964; SDXL U-Net 2,567,463,684; a test builds them on the
meta device and checks).
"""

from __future__ import annotations

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)

SDXL_UNET = dict(
    sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              sample_size=512)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              projection_dim=768)
OPENCLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                     num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                     hidden_act="gelu", projection_dim=1280)

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                 steps_offset=1)

# family -> {component: (class name, config)}; the classes are the ones the adapters load
PUBLISHED = {
    "sd15": {"unet": ("UNet2DConditionModel", SD15_UNET), "vae": ("AutoencoderKL", SD_VAE),
             "text_encoder": ("CLIPTextModel", CLIP_L)},
    "sdxl": {"unet": ("UNet2DConditionModel", SDXL_UNET), "vae": ("AutoencoderKL", SDXL_VAE),
             "text_encoder": ("CLIPTextModel", CLIP_L),
             "text_encoder_2": ("CLIPTextModelWithProjection", OPENCLIP_BIGG)},
}
PUBLISHED_NAMES = {"sd15": "Stable Diffusion 1.5", "sdxl": "SDXL base 1.0"}
