"""Whole-model configurations and the named presets.

    SD15  Stable Diffusion 1.5, exactly (860M-parameter U-Net, 84M VAE, 123M CLIP ViT-L/14 text encoder)
    TINY  the shapes-world model that minisd trains and ships in data/tiny (same classes, toy widths)
    SDXL_BASE, SDXL_REFINER  SDXL 1.0's networks (`SDXLConfig`: two text encoders, added size/crop conditioning)

Variations are made with `dataclasses.replace`, e.g. `replace(SD15, unet=replace(SD15.unet, in_channels=9))`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..diffusion.schedules import SchedulerConfig
from ..models.text_encoder import TextEncoderConfig
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    scheduler: SchedulerConfig

    @property
    def image_size(self) -> int:
        """Native image size in pixels: latent size × the VAE's downsampling (512 for SD 1.5)."""
        return self.unet.sample_size * self.vae.downsampling

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        d = json.loads(text)
        tuples = lambda c: {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}  # noqa: E731
        return cls(unet=UNetConfig(**tuples(d["unet"])), vae=VAEConfig(**tuples(d["vae"])),
                   text_encoder=TextEncoderConfig(**d["text_encoder"]), scheduler=SchedulerConfig(**d["scheduler"]))


SD15 = ModelConfig(
    unet=UNetConfig(),            # the defaults are SD 1.5's U-Net (diffusers' unet/config.json of the Hub repo)
    vae=VAEConfig(),              # ... and its VAE
    text_encoder=TextEncoderConfig(),  # CLIP ViT-L/14's text tower
    scheduler=SchedulerConfig(),  # scaled-linear betas 0.00085–0.012, 1000 steps, steps_offset 1, "leading"
)

TINY = ModelConfig(
    # 16×16×4 latents (f = 4): 2 px of latent per small shape's radius; f = 8 blurred small triangles into circles
    unet=UNetConfig(block_out_channels=(64, 128, 128), cross_attention=(True, True, False), layers_per_block=1,
                    num_heads=(4, 4, 4), cross_attention_dim=128, norm_num_groups=16, sample_size=16),
    # level 0 at 32 channels: at 16 the 1–2 px points of a small star were lost (docs/shapes_world.md)
    vae=VAEConfig(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=8, sample_size=64),
    # vocab: the 512 byte tokens, the merges that spell each shapes-world word as one token, BOS, EOS (656)
    text_encoder=TextEncoderConfig(vocab_size=656, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=4, projection_dim=128),
    scheduler=SchedulerConfig(),
)


# ─── SDXL ──────────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class SDXLConfig:
    """SDXL's networks (Podell et al. 2023): one U-Net, one VAE, two text encoders whose penultimate
    hidden states are concatenated on channels (768 + 1280 = 2048 = the U-Net's E); the second one's
    pooled, projected vector and the size/crop ids enter through the U-Net's `add_embedding`.
    The refiner has only the second encoder (`text_encoder=None`, E = 1280)."""

    unet: UNetConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig | None  # CLIP ViT-L/14 (diffusers' text_encoder/), as in SD 1.x
    text_encoder_2: TextEncoderConfig      # OpenCLIP ViT-bigG/14 with text_projection (text_encoder_2/)
    scheduler: SchedulerConfig

    def __post_init__(self):
        width = self.text_encoder_2.hidden_size + (self.text_encoder.hidden_size if self.text_encoder else 0)
        if width != self.unet.cross_attention_dim:
            raise ValueError(f"SDXLConfig: the text encoders give {width} channels; the U-Net's "
                             f"cross_attention_dim is {self.unet.cross_attention_dim}")
        if self.unet.addition_embed_type != "text_time" or not self.text_encoder_2.with_projection:
            raise ValueError("SDXLConfig needs unet.addition_embed_type=\"text_time\" and "
                             "text_encoder_2.with_projection=True")
        if self.time_ids_count < 1:
            raise ValueError(f"SDXLConfig: unet.projection_class_embeddings_input_dim "
                             f"{self.unet.projection_class_embeddings_input_dim} leaves no room for time ids "
                             f"after the pooled {self.text_encoder_2.projection_dim}")

    @property
    def image_size(self) -> int:
        """Native image size in pixels (1024 for SDXL)."""
        return self.unet.sample_size * self.vae.downsampling

    @property
    def time_ids_count(self) -> int:
        """How many size/crop numbers the U-Net reads: 6 for the base (original h, w, crop top, left,
        target h, w), 5 for the refiner (h, w, top, left, aesthetic score)."""
        u = self.unet
        return (u.projection_class_embeddings_input_dim - self.text_encoder_2.projection_dim) // u.addition_time_embed_dim

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SDXLConfig:
        d = json.loads(text)
        tuples = lambda c: {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}  # noqa: E731
        te = d.get("text_encoder")
        return cls(unet=UNetConfig(**tuples(d["unet"])), vae=VAEConfig(**tuples(d["vae"])),
                   text_encoder=TextEncoderConfig(**te) if te is not None else None,
                   text_encoder_2=TextEncoderConfig(**d["text_encoder_2"]), scheduler=SchedulerConfig(**d["scheduler"]))


# OpenCLIP ViT-bigG/14's text tower (laion2b): 1280 wide, 32 layers of 20 heads, exact GELU, P = 1280
_BIGG = TextEncoderConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          hidden_act="gelu", projection_dim=1280, with_projection=True)
# SDXL's VAE: the SD 1.x architecture retrained; 0.13025 from its config; fp16 decodes overflow (force_upcast)
_SDXL_VAE = VAEConfig(scaling_factor=0.13025, sample_size=1024, force_upcast=True)
# EulerDiscreteScheduler's config in both Hub repos: SD 1.x's betas, "leading" spacing, steps_offset 1
_SDXL_SCHEDULER = SchedulerConfig(timestep_spacing="leading")

SDXL_BASE = SDXLConfig(  # stabilityai/stable-diffusion-xl-base-1.0 (2.6B-parameter U-Net)
    unet=UNetConfig(block_out_channels=(320, 640, 1280), cross_attention=(False, True, True),
                    num_heads=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, sample_size=128,
                    transformer_depth=(1, 2, 10), addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816),  # 1280 pooled + 6 ids × 256
    vae=_SDXL_VAE, text_encoder=TextEncoderConfig(), text_encoder_2=_BIGG, scheduler=_SDXL_SCHEDULER)

SDXL_REFINER = SDXLConfig(  # stabilityai/stable-diffusion-xl-refiner-1.0: bigG only, four levels, depth 4
    unet=UNetConfig(block_out_channels=(384, 768, 1536, 1536), cross_attention=(False, True, True, False),
                    num_heads=(6, 12, 24, 24), cross_attention_dim=1280, use_linear_projection=True, sample_size=128,
                    transformer_depth=4, addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2560),  # 1280 pooled + 5 ids × 256
    vae=_SDXL_VAE, text_encoder=None, text_encoder_2=_BIGG, scheduler=_SDXL_SCHEDULER)
