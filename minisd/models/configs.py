"""Whole-model configurations and the named presets.

    SD15  Stable Diffusion 1.5, exactly (860M-parameter U-Net, 84M VAE, 123M CLIP ViT-L/14 text encoder)
    TINY  the shapes-world model that minisd trains and ships in data/tiny (same classes, toy widths)

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
