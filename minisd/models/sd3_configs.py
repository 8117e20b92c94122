"""Named presets for the SD 3 family's networks: the MMDiT (`MMDiTConfig`) and the T5 encoder (`T5Config`).

    SD3_MEDIUM      stabilityai/stable-diffusion-3-medium: 24 blocks of width 1536 (2B parameters)
    SD35_MEDIUM     stabilityai/stable-diffusion-3.5-medium: SD3_MEDIUM + QK RMSNorm, dual attention in blocks 0..12,
                    a 384-patch position table
    SD35_LARGE      stabilityai/stable-diffusion-3.5-large: 38 blocks of width 2432 (8B) with QK RMSNorm
    T5_XXL          google/t5-v1_1-xxl's encoder (4.7B), SD 3's text_encoder_3
    TINY_MMDIT, TINY_T5  toy widths with the real layouts, for tests and teaching

Each value is its model's diffusers / transformers config.json, read field by field; variations with
`dataclasses.replace`, e.g. `replace(SD3_MEDIUM, num_layers=2)`.
"""

from __future__ import annotations

from .mmdit import MMDiTConfig
from .t5 import T5Config

SD3_MEDIUM = MMDiTConfig()  # the defaults are SD 3 Medium's transformer/config.json

SD35_MEDIUM = MMDiTConfig(pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")

SD35_LARGE = MMDiTConfig(num_layers=38, num_attention_heads=38, caption_projection_dim=38 * 64, qk_norm="rms_norm")

T5_XXL = T5Config()  # the defaults are T5 v1.1 XXL

# 2 blocks, width 64, 32×32 latents in a 48-patch table; a 2-layer T5 of width 64 feeding it
TINY_MMDIT = MMDiTConfig(sample_size=32, num_layers=2, num_attention_heads=2, attention_head_dim=32,
                         joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
                         pos_embed_max_size=48)
TINY_T5 = T5Config(vocab_size=256, d_model=64, d_ff=128, d_kv=32, num_heads=2, num_layers=2)
