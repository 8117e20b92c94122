"""The denoising U-Net of Stable Diffusion: ε_θ(z_t, t, context).

Legend: B batch, C channels, H,W latent height/width, L = H·W image tokens, T text tokens (77),
D time-embedding width (4·C₀), E context width (768 for SD 1.x, 2048 for SDXL), P pooled text width,
W guidance-embedding width (LCM's time_cond_proj_dim).

    z_t (B,4,H,W) ─ conv_in ─ down path ─ mid block ─ up path ─ norm, SiLU, conv_out ─ ε̂ (B,4,H,W)
                               │ skip connections ────────┘
    t ─ sinusoidal embedding ─ MLP ─ emb (B, D), added in every ResnetBlock2D
    context (B,T,E) ─ read by cross-attention in every Transformer2D block

Each level of the down path is `layers_per_block` × (ResnetBlock2D [+ Transformer2D]) and then a
stride-2 conv; the up path mirrors it with one block more per level, each block taking the matching
skip tensor concatenated on channels (Ronneberger et al. 2015; Rombach et al. 2022, §3.3).
Attribute names follow diffusers' `UNet2DConditionModel`, so its checkpoints load with no key map.

SDXL's U-Net (Podell et al. 2023, §2.1) is the same network with four generalisations, all config
fields: `transformer_depth` stacks several transformer blocks per Transformer2D (1, 2, 10 per level),
level 0 has no attention (`cross_attention[0] = False`), proj_in/proj_out are Linear, and
`addition_embed_type="text_time"` adds a second vector to emb ("micro-conditioning", §2.2):

    emb = MLP_t(sin(t)) + MLP_add([pooled text (B,P), sin(size and crop ids) (B, n_ids·256)])

A latent consistency model (Luo et al. 2023, §4.2) has the guidance scale distilled into it: one more
input, an embedding of w (`denoisers.guidance_scale_embedding`, (B, W)), projected by `cond_proj` and added
to the sinusoidal timestep embedding before the time MLP (`time_cond_proj_dim`, diffusers' name):

    emb = MLP_t(sin(t) + W_cond · emb(w))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.attention import Attention
from ..nn.layers import Downsample2D, ResnetBlock2D, TimestepEmbedding, Upsample2D, timestep_embedding
from ..checks import as_tuple, check_bool, check_choice, check_float, check_int, check_levels


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4                   # latent channels (9 for inpainting U-Nets: z, mask, masked-image z)
    out_channels: int = 4                  # predicted ε (or v) channels
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # C per level
    cross_attention: tuple[bool, ...] = (True, True, True, False)  # levels with Transformer2D blocks
    layers_per_block: int = 2              # ResnetBlock2Ds per down level (up levels have one more)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # attention heads per level (diffusers' "attention_head_dim")
    cross_attention_dim: int = 768         # E, the text encoder's width
    norm_num_groups: int = 32              # GroupNorm groups
    norm_eps: float = 1e-5
    use_linear_projection: bool = False    # SD 2.x: Linear proj_in/proj_out; SD 1.x: 1×1 convs
    upcast_attention: bool = False         # SD 2.1: attention in fp32
    flip_sin_to_cos: bool = True           # timestep embedding as [cos, sin]
    freq_shift: float = 0.0
    sample_size: int = 64                  # native latent size (×8 = 512 px for SD 1.5)
    prediction_type: str = "epsilon"       # what the model predicts: "epsilon", "v_prediction" (SD 2.x 768), "sample" or "flow"
    transformer_depth: int | tuple[int, ...] = 1  # transformer blocks per Transformer2D: all levels, or one per
    #                                             level (SDXL base: 1, 2, 10; the mid block takes the last level's)
    addition_embed_type: str | None = None  # "text_time" (SDXL): pooled text + size/crop ids added to emb
    addition_time_embed_dim: int = 256      # SDXL: sinusoidal width of each size/crop id
    projection_class_embeddings_input_dim: int = 2816  # SDXL: P + n_ids·256 (base 1280 + 6·256; refiner 1280 + 5·256)
    time_cond_proj_dim: int | None = None   # W: LCM's guidance-scale embedding width (256 in LCM_Dreamshaper_v7 and
    #                                         the LCM distillation script); None: no guidance input

    def __post_init__(self):
        """Sane ranges before any module is built (a config file is input like any other)."""
        name = "UNetConfig"
        for field in ("in_channels", "out_channels"):
            check_int(name, field, getattr(self, field), 1, 64)
        check_levels(name, "block_out_channels", self.block_out_channels, 1, 8)
        for c in self.block_out_channels:
            check_int(name, "block_out_channels", c, 1, 8192)
        n = len(self.block_out_channels)
        check_levels(name, "cross_attention", self.cross_attention, n, n)
        check_levels(name, "num_heads", self.num_heads, n, n)
        for cross, h in zip(self.cross_attention, self.num_heads):
            check_bool(name, "cross_attention", cross)
            check_int(name, "num_heads", h, 1, 8192)
        check_int(name, "layers_per_block", self.layers_per_block, 1, 8)
        check_int(name, "cross_attention_dim", self.cross_attention_dim, 1, 8192)
        check_int(name, "norm_num_groups", self.norm_num_groups, 1, 8192)
        check_float(name, "norm_eps", self.norm_eps, 0.0, 1.0, lo_open=True)
        for field in ("use_linear_projection", "upcast_attention", "flip_sin_to_cos"):
            check_bool(name, field, getattr(self, field))
        check_float(name, "freq_shift", self.freq_shift, -1000.0, 1000.0)
        check_int(name, "sample_size", self.sample_size, 1, 1024)
        check_choice(name, "prediction_type", self.prediction_type, ("epsilon", "v_prediction", "sample", "flow"))
        if not isinstance(self.transformer_depth, int):
            check_levels(name, "transformer_depth", self.transformer_depth, n, n)
        for depth in self.depths:
            check_int(name, "transformer_depth", depth, 1, 64)
        check_choice(name, "addition_embed_type", self.addition_embed_type, (None, "text_time"))
        check_int(name, "addition_time_embed_dim", self.addition_time_embed_dim, 2, 8192)
        check_int(name, "projection_class_embeddings_input_dim", self.projection_class_embeddings_input_dim, 1, 65536)
        if self.time_cond_proj_dim is not None:
            check_int(name, "time_cond_proj_dim", self.time_cond_proj_dim, 1, 8192)
        for c, h in zip(self.block_out_channels, self.num_heads):
            if c % h or c % self.norm_num_groups:
                raise ValueError(f"channels {c} must divide by heads {h} and groups {self.norm_num_groups}")

    @property
    def time_dim(self) -> int:
        return 4 * self.block_out_channels[0]  # D: 1280 for SD 1.5

    @property
    def depths(self) -> tuple[int, ...]:
        """Transformer blocks per Transformer2D, one entry per level."""
        d = self.transformer_depth
        return (d,) * len(self.block_out_channels) if isinstance(d, int) else d

    # diffusers config.json <-> UNetConfig
    @classmethod
    def from_diffusers(cls, cfg: dict, prediction_type: str = "epsilon") -> UNetConfig:
        """Read a diffusers `unet/config.json`, applying its class defaults for absent keys."""
        unsupported = {
            "class_embed_type": None, "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
            "time_embedding_type": "positional",
            "resnet_time_scale_shift": "default", "act_fn": "silu", "center_input_sample": False,
            "dual_cross_attention": False, "only_cross_attention": False, "conv_in_kernel": 3,
            "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_type": "default",
        }
        for key, default in unsupported.items():
            value = cfg.get(key, default)
            if value != default and not (key == "only_cross_attention" and value == [False] * len(value)):
                raise ValueError(f"unsupported U-Net config {key}={value!r}")
        if cfg.get("addition_embed_type") not in (None, "text_time"):
            raise ValueError(f"unsupported U-Net config addition_embed_type={cfg['addition_embed_type']!r}; "
                             f"expected null or \"text_time\" (SDXL)")
        down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        up = cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
        down = list(as_tuple("UNetConfig", "down_block_types", down))
        up = list(as_tuple("UNetConfig", "up_block_types", up))
        known = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
        if any(not isinstance(t, str) or t not in known for t in down):
            raise ValueError(f"unsupported down_block_types {down}; minisd knows {list(known)}")
        cross = tuple(known[t] for t in down)
        mirror = ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)]
        if up != mirror:
            raise ValueError(f"up_block_types {up} must mirror down_block_types {down} (expected {mirror})")
        channels = as_tuple("UNetConfig", "block_out_channels", cfg.get("block_out_channels", (320, 640, 1280, 1280)))
        # diffusers' historical misnomer: `attention_head_dim` holds the number of heads (diffusers#2011)
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * len(channels)
        if isinstance(cfg.get("layers_per_block"), (list, tuple)):
            raise ValueError(f"per-level layers_per_block={cfg['layers_per_block']} is not supported")
        depth = cfg.get("transformer_layers_per_block", 1)
        depth = tuple(depth) if isinstance(depth, list) else depth
        if cfg.get("downsample_padding", 1) != 1 or cfg.get("mid_block_scale_factor", 1) != 1:
            raise ValueError("unsupported downsample_padding / mid_block_scale_factor (SD uses 1 and 1)")
        if isinstance(cfg.get("cross_attention_dim", 768), (list, tuple)):
            raise ValueError(f"per-level cross_attention_dim={cfg['cross_attention_dim']} is not supported")
        return cls(
            in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
            block_out_channels=channels, cross_attention=cross, layers_per_block=cfg.get("layers_per_block", 2),
            num_heads=heads, cross_attention_dim=cfg.get("cross_attention_dim", 1280),
            norm_num_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5),
            use_linear_projection=cfg.get("use_linear_projection", False),
            upcast_attention=cfg.get("upcast_attention", False) or False,
            flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=cfg.get("freq_shift", 0),
            sample_size=cfg.get("sample_size", 64), prediction_type=prediction_type, transformer_depth=depth,
            addition_embed_type=cfg.get("addition_embed_type"),
            addition_time_embed_dim=cfg.get("addition_time_embed_dim") or 256,
            projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim") or 2816,
            time_cond_proj_dim=cfg.get("time_cond_proj_dim"),
        )

    def to_diffusers(self) -> dict:
        down = ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in self.cross_attention]
        up = ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(self.cross_attention)]
        heads = self.num_heads[0] if len(set(self.num_heads)) == 1 else list(self.num_heads)
        extra = {}  # SDXL's and LCM's fields, written only when used: SD 1.x configs stay as they were
        if self.transformer_depth != 1:
            d = self.transformer_depth
            extra["transformer_layers_per_block"] = d if isinstance(d, int) else list(d)
        if self.addition_embed_type is not None:
            extra.update(addition_embed_type=self.addition_embed_type, addition_embed_type_num_heads=64,
                         addition_time_embed_dim=self.addition_time_embed_dim,
                         projection_class_embeddings_input_dim=self.projection_class_embeddings_input_dim)
        if self.time_cond_proj_dim is not None:
            extra["time_cond_proj_dim"] = self.time_cond_proj_dim
        return extra | {
            "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": heads,
            "block_out_channels": list(self.block_out_channels), "center_input_sample": False,
            "cross_attention_dim": self.cross_attention_dim, "down_block_types": down, "downsample_padding": 1,
            "flip_sin_to_cos": self.flip_sin_to_cos, "freq_shift": self.freq_shift,
            "in_channels": self.in_channels, "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": 1, "norm_eps": self.norm_eps, "norm_num_groups": self.norm_num_groups,
            "out_channels": self.out_channels, "sample_size": self.sample_size, "up_block_types": up,
            "use_linear_projection": self.use_linear_projection, "upcast_attention": self.upcast_attention,
        }


class TimeEmbedding(TimestepEmbedding):
    """The time MLP (Linear, SiLU, Linear), with LCM's guidance input when `cond_dim` is set: the embedded
    guidance scale (B, W), projected to the sinusoid's width with no bias, is added before the MLP (diffusers'
    `TimestepEmbedding(cond_proj_dim=...)`). Without it, plain `TimestepEmbedding`, key for key."""

    def __init__(self, in_dim: int, time_dim: int, cond_dim: int | None = None):
        super().__init__(in_dim, time_dim)
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim is not None else None

    def forward(self, emb: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is not None:
            if self.cond_proj is None:
                raise ValueError("timestep_cond given, but this U-Net has no guidance embedding (time_cond_proj_dim "
                                 "is None; an LCM-distilled U-Net has one)")
            emb = emb + self.cond_proj(cond.to(self.cond_proj.weight.dtype))  # (B, C₀)
        return super().forward(emb)


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): W₂ (a ⊙ GELU(g)), with [a, g] = W₁ x split in two halves."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, 2 * mult * dim)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(mult * dim, dim)])  # names: net.0.proj, net.2

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.net[0].proj(x).chunk(2, dim=-1)
        return self.net[2](a * F.gelu(gate))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention to the text, GEGLU MLP."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim // heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads=heads, dim_head=dim // heads, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))           # pixels look at pixels
        x = x + self.attn2(self.norm2(x), context)  # pixels look at the prompt
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """The 'spatial transformer': image (B,C,H,W) → tokens (B,L,C) → `depth` transformer blocks → image, plus x."""

    def __init__(self, channels: int, heads: int, cfg: UNetConfig, depth: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        self.use_linear = cfg.use_linear_projection
        proj = (lambda: nn.Linear(channels, channels)) if self.use_linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, cfg.cross_attention_dim, cfg.upcast_attention) for _ in range(depth)])
        self.proj_out = proj()

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, L, C)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


class DownBlock(nn.Module):
    """One level of the down path: resnets (each followed by a Transformer2D on cross-attention levels),
    then a stride-2 downsampler except on the last level. Returns the output and its skip tensors."""

    def __init__(self, in_ch: int, out_ch: int, heads: int, cross: bool, last: bool, cfg: UNetConfig,
                 depth: int = 1):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, cfg.time_dim,
                                                    cfg.norm_num_groups, cfg.norm_eps) for i in range(n)])
        self.attentions = nn.ModuleList([Transformer2D(out_ch, heads, cfg, depth) for _ in range(n)]) if cross else None
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(out_ch)])

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """One level of the up path: layers_per_block+1 resnets, each eating one skip tensor
    (concatenated on channels), Transformer2Ds on cross-attention levels, then a 2× upsampler."""

    def __init__(self, in_ch: int, out_ch: int, prev_ch: int, heads: int, cross: bool, last: bool,
                 cfg: UNetConfig, depth: int = 1):
        super().__init__()
        n = cfg.layers_per_block + 1
        # skip channels, deepest first: the level's own outputs, then what entered the level
        skip_chs = [out_ch] * (n - 1) + [in_ch]
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_ch if i == 0 else out_ch) + skip_chs[i], out_ch, cfg.time_dim,
                          cfg.norm_num_groups, cfg.norm_eps) for i in range(n)])
        self.attentions = nn.ModuleList([Transformer2D(out_ch, heads, cfg, depth) for _ in range(n)]) if cross else None
        self.upsamplers = None if last else nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, x: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor,
                out_size: tuple[int, int] | None) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), emb)  # (B, C + C_skip, H, W) -> (B, C, H, W)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, out_size)
        return x


class MidBlock(nn.Module):
    """The bottleneck: ResnetBlock2D, Transformer2D, ResnetBlock2D at the lowest resolution."""

    def __init__(self, ch: int, heads: int, cfg: UNetConfig, depth: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, cfg.time_dim, cfg.norm_num_groups, cfg.norm_eps)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2D(ch, heads, cfg, depth)])

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        x = self.resnets[0](x, emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, emb)


class UNet(nn.Module):
    """ε_θ(z_t, t, context): the noise (or v) that the model sees in z_t at timestep t, given the text."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        chs = cfg.block_out_channels
        n = len(chs)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimeEmbedding(chs[0], cfg.time_dim, cfg.time_cond_proj_dim)
        if cfg.addition_embed_type == "text_time":  # SDXL; diffusers' add_time_proj is the parameter-free sinusoid
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_dim)
        depths = cfg.depths
        self.down_blocks = nn.ModuleList([
            DownBlock(chs[max(i - 1, 0)], chs[i], cfg.num_heads[i], cfg.cross_attention[i], i == n - 1, cfg, depths[i])
            for i in range(n)])
        self.mid_block = MidBlock(chs[-1], cfg.num_heads[-1], cfg, depths[-1])
        up = []
        for j in range(n):  # j counts up blocks, deepest first; level i = n-1-j
            i = n - 1 - j
            up.append(UpBlock(chs[max(i - 1, 0)], chs[i], chs[min(i + 1, n - 1)], cfg.num_heads[i],
                              cfg.cross_attention[i], j == n - 1, cfg, depths[i]))
        self.up_blocks = nn.ModuleList(up)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(self, z_t: Tensor, t: Tensor | float, context: Tensor,
                control: tuple[list[Tensor], Tensor] | None = None, *,
                pooled: Tensor | None = None, time_ids: Tensor | None = None,
                timestep_cond: Tensor | None = None) -> Tensor:
        """z_t (B, C_in, H, W), t scalar or (B,), context (B, T, E) -> (B, C_out, H, W).

        `control`: ControlNet residuals (one per skip tensor, plus one for the mid block), added to
        the skip connections and the bottleneck (Zhang et al. 2023, eq. 4).
        `pooled` (B, P) and `time_ids` (B, n_ids): SDXL's added conditions (diffusers' `text_embeds` and
        `time_ids`), required exactly when `config.addition_embed_type == "text_time"`.
        `timestep_cond` (B, W): an LCM U-Net's embedded guidance scale (`config.time_cond_proj_dim`); without it
        the U-Net runs unguided, as diffusers' does.
        """
        B = z_t.shape[0]
        t = torch.as_tensor(t, device=z_t.device).reshape(-1)
        t = t.expand(B) if t.numel() == 1 else t  # one timestep for the batch, or one per sample
        emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                 self.config.freq_shift)
        emb = self.time_embedding(emb.to(z_t.dtype), timestep_cond)  # (B, D)
        if self.config.addition_embed_type == "text_time":
            emb = emb + self.added_embedding(pooled, time_ids, B)
        elif pooled is not None or time_ids is not None:
            raise ValueError("pooled/time_ids given, but this U-Net has no added conditioning "
                             "(addition_embed_type is None; SDXL's is \"text_time\")")

        x = self.conv_in(z_t)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips += block_skips
        x = self.mid_block(x, emb, context)
        if control is not None:
            down_residuals, mid_residual = control
            if len(down_residuals) != len(skips):
                raise ValueError(f"control has {len(down_residuals)} down residuals, the U-Net {len(skips)} skips")
            skips = [s + r for s, r in zip(skips, down_residuals)]
            x = x + mid_residual

        for block in self.up_blocks:
            n = len(block.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            # upsample to the size of the next skip tensor (odd latent sizes round down on the way down)
            out_size = tuple(skips[-1].shape[-2:]) if skips else None
            x = block(x, level_skips, emb, context, out_size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def added_embedding(self, pooled: Tensor | None, time_ids: Tensor | None, B: int) -> Tensor:
        """SDXL's micro-conditioning (Podell et al. 2023, §2.2): see `text_time_embedding`."""
        return text_time_embedding(self.add_embedding, self.config, pooled, time_ids, B)


def text_time_embedding(mlp: nn.Module, cfg: UNetConfig, pooled: Tensor | None, time_ids: Tensor | None,
                        B: int) -> Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, §2.2): each of the n_ids size/crop numbers
    (original h, w, crop top, left, target h, w; the refiner: h, w, top, left, aesthetic score)
    gets a 256-wide sinusoid, like t; with the pooled text vector they go through one MLP -> (B, D).
    The U-Net's and an SDXL ControlNet's `add_embedding` both compute it."""
    if pooled is None or time_ids is None:
        raise ValueError("this U-Net (addition_embed_type=\"text_time\", SDXL) needs pooled (B, P) and "
                         f"time_ids (B, n_ids); got pooled={pooled is not None and tuple(pooled.shape)}, "
                         f"time_ids={time_ids is not None and tuple(time_ids.shape)}")
    width = pooled.shape[-1] + time_ids.shape[-1] * cfg.addition_time_embed_dim
    if pooled.shape[0] != B or time_ids.shape[0] != B or width != cfg.projection_class_embeddings_input_dim:
        raise ValueError(f"pooled {tuple(pooled.shape)} and time_ids {tuple(time_ids.shape)} for batch {B} give "
                         f"{width} features; the U-Net expects {cfg.projection_class_embeddings_input_dim} "
                         f"(P + n_ids·{cfg.addition_time_embed_dim})")
    ids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                             cfg.freq_shift)  # (B·n_ids, 256)
    features = torch.cat([pooled, ids.reshape(B, -1).to(pooled.dtype)], dim=-1)  # (B, P + n_ids·256)
    return mlp(features.to(mlp.linear_1.weight.dtype))  # (B, D)
