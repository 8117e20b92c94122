"""AnimateDiff's motion module: attention across frames, added to a frozen image U-Net (Guo et al. 2023).

Legend: B videos, F frames per video, C channels, H,W latent height/width, L = H·W pixels,
nh heads, D time-embedding width, T text tokens, E context width.

The image U-Net runs on the B·F frames as one batch: each spatial block sees one frame at a time.
After every spatial block (each resnet [+ Transformer2D] of the down and up paths, and the mid
block's attention) a *motion module* lets every pixel look at the same pixel in the other frames:

    (B·F, C, H, W) ─ GroupNorm ─ (B·L, F, C) ─ proj_in ─ temporal blocks ─ proj_out ─ (B·F, C, H, W), plus x
    temporal block:  x + SelfAttn(PE + LN(x)),  x + SelfAttn(PE + LN(x)),  x + GEGLU-MLP(LN(x))

PE is the Transformer's sinusoidal position of the frame (Vaswani et al. 2017, §3.5), for up to
`max_seq_length` frames. proj_out starts at zero (AnimateDiff's `zero_initialize`), so a fresh motion
module is the identity and the video U-Net starts as the image U-Net, frame by frame.

minisd's one extension (`MotionAdapterConfig.text_cross_attention_dim`): the second attention of each temporal
block reads the caption instead of the frames again, its queries carrying the frame's position and the pixel's place
in the picture (`image_positions`), so the module can follow "moving to the left" — AnimateDiff's module reads no
text and gets the caption only through the image U-Net's frames. The weights keep diffusers' names; diffusers'
MotionAdapter has no such input and refuses the attention's widths.

Attribute names are those of diffusers' `MotionAdapter` (`down_blocks.0.motion_modules.0.transformer_blocks.0.
attn1.to_q`), so its checkpoints load with no key map; minisd.formats.motion converts AnimateDiff's own files.
Numerics follow diffusers' `UNetMotionModel`: its GroupNorm takes statistics over all F frames of a video,
where AnimateDiff's original code normalises each frame on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import as_tuple, check_bool, check_int, check_levels
from ..nn.attention import Attention
from ..nn.layers import timestep_embedding
from .unet import FeedForward, UNet


@dataclass(frozen=True)
class MotionAdapterConfig:
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # C per level: the U-Net's
    layers_per_block: int = 2              # motion modules per down level: the U-Net's layers_per_block (up: one more)
    transformer_depth: int | tuple[int, ...] = 1  # temporal blocks per motion module: all levels, or one per level
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # temporal attention heads per level
    norm_num_groups: int = 32              # GroupNorm groups of each motion module
    max_seq_length: int = 32               # frames that have a position (rows of the sinusoid table; v1 files: 24)
    mid_block: bool = True                 # a motion module in the mid block (AnimateDiff v2 and later)
    mid_transformer_depth: int = 1         # temporal blocks of the mid block's motion module
    # minisd's extension: E > 0 makes each temporal block's second attention read the caption (E the context
    # width) instead of the frames again; diffusers' MotionAdapter has no such input and cannot load it
    text_cross_attention_dim: int | None = None

    def __post_init__(self):
        name = "MotionAdapterConfig"
        check_levels(name, "block_out_channels", self.block_out_channels, 1, 8)
        n = len(self.block_out_channels)
        check_levels(name, "num_heads", self.num_heads, n, n)
        if not isinstance(self.transformer_depth, int):
            check_levels(name, "transformer_depth", self.transformer_depth, n, n)
        for depth in self.depths:
            check_int(name, "transformer_depth", depth, 1, 64)
        check_int(name, "layers_per_block", self.layers_per_block, 1, 8)
        check_int(name, "norm_num_groups", self.norm_num_groups, 1, 8192)
        check_int(name, "max_seq_length", self.max_seq_length, 1, 4096)
        check_bool(name, "mid_block", self.mid_block)
        check_int(name, "mid_transformer_depth", self.mid_transformer_depth, 1, 64)
        if self.text_cross_attention_dim is not None:
            check_int(name, "text_cross_attention_dim", self.text_cross_attention_dim, 1, 1 << 16)
        for c, h in zip(self.block_out_channels, self.num_heads):
            check_int(name, "block_out_channels", c, 1, 8192)
            check_int(name, "num_heads", h, 1, 8192)
            if c % h or c % self.norm_num_groups or c % 2:
                raise ValueError(f"{name}: channels {c} must be even and divide by heads {h} and groups "
                                 f"{self.norm_num_groups}")

    @property
    def depths(self) -> tuple[int, ...]:
        """Temporal transformer blocks per motion module, one entry per level."""
        d = self.transformer_depth
        return (d,) * len(self.block_out_channels) if isinstance(d, int) else d

    # diffusers config.json <-> MotionAdapterConfig
    @classmethod
    def from_diffusers(cls, cfg: dict) -> MotionAdapterConfig:
        """Read a diffusers `MotionAdapter` config.json, applying its class defaults for absent keys."""
        unsupported = {"conv_in_channels": None, "motion_mid_block_layers_per_block": 1,
                       "motion_activation_fn": "geglu", "motion_attention_bias": False,
                       "motion_cross_attention_dim": None}
        for key, default in unsupported.items():
            if cfg.get(key, default) != default:
                raise ValueError(f"unsupported MotionAdapter config {key}={cfg[key]!r}; minisd supports {default!r}")
        channels = as_tuple("MotionAdapterConfig", "block_out_channels",
                            cfg.get("block_out_channels", (320, 640, 1280, 1280)))
        n = len(channels)

        def per_level(key: str, default) -> tuple:
            value = cfg.get(key, default)
            return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n

        layers = per_level("motion_layers_per_block", 2)
        if len(set(layers)) != 1:  # the minisd U-Net has one layers_per_block for every level
            raise ValueError(f"per-level motion_layers_per_block={list(layers)} is not supported; expected one number")
        depths = per_level("motion_transformer_layers_per_block", 1)
        if any(not isinstance(d, int) for d in depths):
            raise ValueError(f"per-layer motion_transformer_layers_per_block={cfg['motion_transformer_layers_per_block']}"
                             f" is not supported; expected a number or one number per level")
        mid_depth = cfg.get("motion_transformer_layers_per_mid_block", 1)
        mid_depth = mid_depth[0] if isinstance(mid_depth, (list, tuple)) and len(mid_depth) == 1 else mid_depth
        return cls(block_out_channels=channels, layers_per_block=layers[0],
                   transformer_depth=depths[0] if len(set(depths)) == 1 else depths,
                   num_heads=per_level("motion_num_attention_heads", 8),
                   norm_num_groups=cfg.get("motion_norm_num_groups", 32),
                   max_seq_length=cfg.get("motion_max_seq_length", 32),
                   mid_block=cfg.get("use_motion_mid_block", True), mid_transformer_depth=mid_depth,
                   text_cross_attention_dim=cfg.get(TEXT_KEY))

    def to_diffusers(self) -> dict:
        """The config.json of a diffusers MotionAdapter (with minisd's key for the text cross-attention, if any,
        which diffusers ignores: it then refuses the attention's weights, whose widths are not its own)."""
        heads = self.num_heads[0] if len(set(self.num_heads)) == 1 else list(self.num_heads)
        d = self.transformer_depth
        text = {} if self.text_cross_attention_dim is None else {TEXT_KEY: self.text_cross_attention_dim}
        return {**text,
            "_class_name": "MotionAdapter", "block_out_channels": list(self.block_out_channels),
            "motion_layers_per_block": self.layers_per_block,
            "motion_transformer_layers_per_block": d if isinstance(d, int) else list(d),
            "motion_mid_block_layers_per_block": 1,
            "motion_transformer_layers_per_mid_block": self.mid_transformer_depth,
            "motion_num_attention_heads": heads, "motion_norm_num_groups": self.norm_num_groups,
            "motion_max_seq_length": self.max_seq_length, "use_motion_mid_block": self.mid_block,
            "conv_in_channels": None,
        }


TEXT_KEY = "minisd_text_cross_attention_dim"  # config.json's key for MotionAdapterConfig.text_cross_attention_dim

# guoyww/animatediff-motion-adapter-v1-5-2 (AnimateDiff v2, mm_sd_v15_v2.ckpt): the defaults above
ANIMATEDIFF_SD15_V2 = MotionAdapterConfig()


def sinusoids(position: Tensor, dim: int) -> Tensor:
    """The Transformer's position code (Vaswani et al. 2017, §3.5) of n positions (n,) -> (n, dim), fp32:

        PE[p, 2i] = sin(p / 10000^(2i/dim)),   PE[p, 2i+1] = cos(p / 10000^(2i/dim))
    """
    omega = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))  # (dim/2,)
    angle = position.float().unsqueeze(1) * omega  # (n, dim/2)
    pe = torch.zeros(len(position), dim)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angle), torch.cos(angle)
    return pe


def sinusoidal_positions(max_seq_length: int, dim: int) -> Tensor:
    """The frames' position table, (1, max_seq_length, dim), fp32: `sinusoids` of 0, 1, ..., max_seq_length − 1."""
    return sinusoids(torch.arange(max_seq_length), dim).unsqueeze(0)


class SinusoidalPositionalEmbedding(nn.Module):
    """Adds the frame's position to each token of a (N, F, C) sequence. `pe` is a saved buffer, as in diffusers'
    files (a fixed table, not a learned weight)."""

    def __init__(self, dim: int, max_seq_length: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_positions(max_seq_length, dim))

    def forward(self, x: Tensor) -> Tensor:
        frames = x.shape[1]
        if frames > self.pe.shape[1]:
            raise ValueError(f"{frames} frames, but this motion module has positions for at most {self.pe.shape[1]} "
                             f"(max_seq_length)")
        return x + self.pe[:, :frames].to(x.dtype)


def image_positions(height: int, width: int, dim: int, size: int = 16) -> Tensor:
    """Where each pixel of an (height × width) feature map is, as sinusoids (L, 1, dim), L = height·width: the first
    dim/2 channels the row's, the rest the column's (`sinusoidal_positions`' formula), in the units of a
    `size`-pixel map, so that a pixel of a coarser level has the position of the same place in the picture."""
    def axis(n: int, d: int) -> Tensor:  # (n, d): each pixel's centre, in units of the `size`-pixel map
        return sinusoids((torch.arange(n) + 0.5) * (size / n), d)

    rows, cols = axis(height, dim // 2), axis(width, dim - dim // 2)  # (H, d/2), (W, d/2)
    return torch.cat([rows[:, None].expand(-1, width, -1), cols[None].expand(height, -1, -1)], -1).reshape(-1, 1, dim)


class TemporalTransformerBlock(nn.Module):
    """Pre-LayerNorm block over the frames of one pixel: two self-attentions (diffusers' `double_self_attention`;
    AnimateDiff's ("Temporal_Self", "Temporal_Self")), each reading the positions, then a GEGLU MLP.

    With `text_dim` (minisd's extension) the second attention is a cross-attention to the caption instead: each
    frame of each pixel, the frame's position and the pixel's place in the picture added (`image_positions`), asks
    the text (B, T, E) what to be, so one query reads "to the left" together with "I am frame 6, near the right
    edge". (A temporal block alone does not know where its pixel is: its sequences are one pixel's frames.)"""

    def __init__(self, dim: int, heads: int, max_seq_length: int, text_dim: int | None = None):
        super().__init__()
        self.pos_embed = SinusoidalPositionalEmbedding(dim, max_seq_length)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, text_dim, heads=heads, dim_head=dim // heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor | None = None, where: Tensor | None = None) -> Tensor:
        """x (B·L, F, C), each video's L pixels consecutive; if the block reads text, context (B, T, E) and where
        (L, 1, C), the pixels' places (`image_positions`) -> (B·L, F, C)."""
        x = x + self.attn1(self.pos_embed(self.norm1(x)))  # frames look at frames
        if not self.attn2.is_cross:
            return self.ff_step(x + self.attn2(self.pos_embed(self.norm2(x))))  # ... twice
        if context is None or where is None:
            raise ValueError("this motion module reads the caption (text_cross_attention_dim): pass context and where")
        BL, F_, C = x.shape
        B = context.shape[0]
        q = self.pos_embed(self.norm2(x)).unflatten(0, (B, -1)) + where.to(x.dtype)  # (B, L, F, C)
        # the text is one per video: its L·F queries form one sequence (queries do not see each other)
        q = q.reshape(B, BL // B * F_, C)  # (B, L·F, C)
        return self.ff_step(x + self.attn2(q, context).reshape(BL, F_, C))

    def ff_step(self, x: Tensor) -> Tensor:
        return x + self.ff(self.norm3(x))


class AnimateDiffTransformer3D(nn.Module):
    """One motion module: each pixel's sequence of F frames → `depth` temporal blocks → back, plus x."""

    def __init__(self, channels: int, heads: int, depth: int, cfg: MotionAdapterConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(channels, heads, cfg.max_seq_length, cfg.text_cross_attention_dim)
             for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels)
        self.reads_text = cfg.text_cross_attention_dim is not None
        self._places: dict = {}  # (H, W, device) -> image_positions, built once per feature-map size

    def places(self, height: int, width: int, device: torch.device) -> Tensor:
        """`image_positions` of an (height × width) map, (L, 1, C), made once for each size and device."""
        key = (height, width, device)
        if key not in self._places:
            self._places[key] = image_positions(height, width, self.proj_in.out_features).to(device)
        return self._places[key]

    def forward(self, x: Tensor, num_frames: int, context: Tensor | None = None) -> Tensor:
        """x (B·F, C, H, W), frames of a video consecutive; context (B, T, E), read only by blocks that read
        text -> (B·F, C, H, W)."""
        BF, C, H, W = x.shape
        B = BF // num_frames
        h = x.reshape(B, num_frames, C, H, W).permute(0, 2, 1, 3, 4)  # (B, C, F, H, W)
        h = self.norm(h)  # statistics over the whole video (diffusers), not per frame (AnimateDiff's code)
        h = h.permute(0, 3, 4, 2, 1).reshape(B * H * W, num_frames, C)  # (B·L, F, C)
        h = self.proj_in(h)
        where = self.places(H, W, h.device) if self.reads_text else None  # (L, 1, C)
        for block in self.transformer_blocks:
            h = block(h, context, where)
        h = self.proj_out(h)
        h = h.reshape(B, H, W, num_frames, C).permute(0, 3, 4, 1, 2).reshape(BF, C, H, W)  # (B·F, C, H, W)
        return h + x


class MotionModules(nn.Module):
    """The motion modules of one level (diffusers' container: `motion_modules.i`)."""

    def __init__(self, channels: int, heads: int, n: int, depth: int, cfg: MotionAdapterConfig):
        super().__init__()
        self.motion_modules = nn.ModuleList([AnimateDiffTransformer3D(channels, heads, depth, cfg) for _ in range(n)])


class MotionAdapter(nn.Module):
    """All motion modules for a U-Net of the same levels: layers_per_block per down level, one in the
    mid block (if `mid_block`), layers_per_block + 1 per up level (deepest first, as the U-Net's up path)."""

    def __init__(self, cfg: MotionAdapterConfig):
        super().__init__()
        self.config = cfg
        chs, heads, depths, n = cfg.block_out_channels, cfg.num_heads, cfg.depths, cfg.layers_per_block
        self.down_blocks = nn.ModuleList([MotionModules(chs[i], heads[i], n, depths[i], cfg)
                                          for i in range(len(chs))])
        self.mid_block = MotionModules(chs[-1], heads[-1], 1, cfg.mid_transformer_depth, cfg) if cfg.mid_block \
            else None
        self.up_blocks = nn.ModuleList([MotionModules(chs[i], heads[i], n + 1, depths[i], cfg)
                                        for i in reversed(range(len(chs)))])
        self.init_weights()

    def init_weights(self) -> None:
        """PyTorch's default initialisation, then every proj_out at zero: a fresh adapter changes nothing."""
        for module in self.modules():
            if isinstance(module, AnimateDiffTransformer3D):
                nn.init.zeros_(module.proj_out.weight)
                nn.init.zeros_(module.proj_out.bias)


class VideoUNet(nn.Module):
    """ε_θ for videos: a minisd `UNet` with a `MotionAdapter`'s modules after each of its spatial blocks,
    equal to diffusers' `UNetMotionModel.from_unet2d(unet, motion_adapter)`. The U-Net's own blocks are
    used as they are (shared, not copied), so the image model stays the image model."""

    def __init__(self, unet: UNet, adapter: MotionAdapter):
        super().__init__()
        u, m = unet.config, adapter.config
        if u.addition_embed_type is not None:
            raise ValueError(f"VideoUNet runs SD 1.x/2.x U-Nets; this one has addition_embed_type="
                             f"{u.addition_embed_type!r} (SDXL)")
        if (u.block_out_channels, u.layers_per_block) != (m.block_out_channels, m.layers_per_block):
            raise ValueError(f"motion adapter for block_out_channels={m.block_out_channels}, layers_per_block="
                             f"{m.layers_per_block}; the U-Net has {u.block_out_channels}, {u.layers_per_block}")
        self.unet, self.adapter = unet, adapter

    def forward(self, z_t: Tensor, t: Tensor | float, context: Tensor, num_frames: int | None = None) -> Tensor:
        """z_t (B, C, F, H, W), t scalar or (B,), context (B, T, E) or (B·F, T, E) -> ε̂ of z_t's shape.

        Also takes z_t folded as diffusers' pipelines feed the image U-Net, (B·F, C, H, W) with each video's
        frames consecutive, together with `num_frames`; the result is then folded the same way.
        """
        if z_t.ndim == 5:
            if num_frames not in (None, z_t.shape[2]):
                raise ValueError(f"num_frames={num_frames} but z_t {tuple(z_t.shape)} has {z_t.shape[2]} (B, C, F, H, W)")
            B, C, num_frames, H, W = z_t.shape
            x = z_t.transpose(1, 2).reshape(B * num_frames, C, H, W)  # (B·F, C, H, W)
        elif z_t.ndim == 4 and isinstance(num_frames, int) and num_frames > 0 and z_t.shape[0] % num_frames == 0:
            B, x = z_t.shape[0] // num_frames, z_t
        else:
            raise ValueError(f"z_t {tuple(z_t.shape)} with num_frames={num_frames}: expected (B, C, F, H, W), or "
                             f"(B·F, C, H, W) with num_frames dividing its first dimension")
        if context.shape[0] == B:
            context = context.repeat_interleave(num_frames, dim=0)  # (B·F, T, E): each frame reads its video's text
        elif context.shape[0] != B * num_frames:
            raise ValueError(f"context {tuple(context.shape)}: expected B={B} or B·F={B * num_frames} rows")
        emb = self.time_embedding(t, B, x).repeat_interleave(num_frames, dim=0)  # (B·F, D)
        text = context[::num_frames]  # (B, T, E): a video's first frame's text, for motion modules that read it
        x, skips = self.down(self.unet.conv_in(x), emb, context, num_frames, text)
        x = self.mid(x, emb, context, num_frames, text)
        x = self.up(x, skips, emb, context, num_frames, text)
        eps = self.unet.conv_out(F.silu(self.unet.conv_norm_out(x)))  # (B·F, C, H, W)
        if z_t.ndim == 4:
            return eps
        return eps.reshape(B, num_frames, *eps.shape[1:]).transpose(1, 2)  # (B, C, F, H, W)

    def time_embedding(self, t: Tensor | float, B: int, x: Tensor) -> Tensor:
        """emb (B, D), one timestep per video, as the U-Net computes it."""
        cfg = self.unet.config
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        if t.numel() not in (1, B):
            raise ValueError(f"t has {t.numel()} timesteps; expected one, or one per video ({B})")
        t = t.expand(B) if t.numel() == 1 else t
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        return self.unet.time_embedding(emb.to(x.dtype))

    def down(self, x: Tensor, emb: Tensor, context: Tensor, num_frames: int,
             text: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """The down path, each resnet [+ Transformer2D] followed by its motion module; returns x and the skips."""
        skips = [x]
        for block, motion in zip(self.unet.down_blocks, self.adapter.down_blocks):
            for i, resnet in enumerate(block.resnets):
                x = resnet(x, emb)
                if block.attentions is not None:
                    x = block.attentions[i](x, context)
                x = motion.motion_modules[i](x, num_frames, text)
                skips.append(x)
            if block.downsamplers is not None:
                x = block.downsamplers[0](x)
                skips.append(x)
        return x, skips

    def mid(self, x: Tensor, emb: Tensor, context: Tensor, num_frames: int, text: Tensor | None = None) -> Tensor:
        """Resnet, Transformer2D, motion module (if the adapter has one), resnet."""
        block = self.unet.mid_block
        x = block.attentions[0](block.resnets[0](x, emb), context)
        if self.adapter.mid_block is not None:
            x = self.adapter.mid_block.motion_modules[0](x, num_frames, text)
        return block.resnets[1](x, emb)

    def up(self, x: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor, num_frames: int,
           text: Tensor | None = None) -> Tensor:
        """The up path, each resnet (eating one skip) [+ Transformer2D] followed by its motion module."""
        for block, motion in zip(self.unet.up_blocks, self.adapter.up_blocks):
            n = len(block.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            for i, resnet in enumerate(block.resnets):
                x = resnet(torch.cat([x, level_skips.pop()], dim=1), emb)  # (B·F, C + C_skip, H, W) -> (B·F, C, H, W)
                if block.attentions is not None:
                    x = block.attentions[i](x, context)
                x = motion.motion_modules[i](x, num_frames, text)
            if block.upsamplers is not None:
                # to the size of the next skip tensor, as the U-Net does (odd latent sizes)
                x = block.upsamplers[0](x, tuple(skips[-1].shape[-2:]))
        return x


__all__ = ["ANIMATEDIFF_SD15_V2", "AnimateDiffTransformer3D", "image_positions", "MotionAdapter", "MotionAdapterConfig",
           "MotionModules", "TemporalTransformerBlock", "VideoUNet", "sinusoidal_positions"]
