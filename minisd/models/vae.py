"""The KL-regularised autoencoder (VAE) that moves Stable Diffusion between pixels and latents.

Legend: B batch, C channels, H,W image size, h,w = H/f, W/f latent size (f = 8 for SD), Z latent
channels (4).

    x (B,3,H,W) ─ Encoder ─ quant_conv ─ [μ, log σ²] (B,2Z,h,w) ─ sample ─ z₀ ─ post_quant_conv ─ Decoder ─ x̂

The encoder outputs a diagonal Gaussian q(z|x) = N(μ, σ²) (Kingma & Welling 2014); training adds a
small KL(q ‖ N(0, I)) term (Rombach et al. 2022, §3 and appendix G). Diffusion runs on
z = scaling_factor · z₀, the scale chosen so z has unit variance over the data (0.18215 for SD 1.x).
Attribute names follow diffusers' `AutoencoderKL`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.attention import Attention
from ..nn.layers import Downsample2D, ResnetBlock2D, Upsample2D
from ..checks import as_tuple, check_bool, check_float, check_int, check_levels


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3                    # image channels
    out_channels: int = 3
    latent_channels: int = 4                # Z
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one level per entry; f = 2^(levels-1)
    layers_per_block: int = 2               # ResnetBlock2Ds per encoder level (decoder: one more)
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215         # SD 1.x latent scale, from the LDM config (`scale_factor`)
    sample_size: int = 512                  # native image size, px
    force_upcast: bool = True               # from diffusers' config; an fp16 decode that overflows is redone in fp32
    # SD 3's VAE (Esser et al. 2024): 16 channels, z = scaling_factor · (z₀ − shift_factor), and no 1×1 convs
    # around the latent (diffusers' use_quant_conv / use_post_quant_conv false); None: no shift (SD 1.x, SDXL)
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def __post_init__(self):
        """Sane ranges before any module is built (a config file is input like any other)."""
        name = "VAEConfig"
        for field in ("in_channels", "out_channels", "latent_channels"):
            check_int(name, field, getattr(self, field), 1, 64)
        check_levels(name, "block_out_channels", self.block_out_channels, 1, 8)
        for c in self.block_out_channels:
            check_int(name, "block_out_channels", c, 1, 8192)
        check_int(name, "layers_per_block", self.layers_per_block, 1, 8)
        check_int(name, "norm_num_groups", self.norm_num_groups, 1, 8192)
        # 0 would decode every latent to the same (black) picture; SD uses 0.13025–0.18215, the tiny model ~1
        check_float(name, "scaling_factor", self.scaling_factor, 0.0, 100.0, lo_open=True)
        check_int(name, "sample_size", self.sample_size, 8, 8192)
        check_bool(name, "force_upcast", self.force_upcast)
        if self.shift_factor is not None:
            check_float(name, "shift_factor", self.shift_factor, -100.0, 100.0)
        check_bool(name, "use_quant_conv", self.use_quant_conv)
        check_bool(name, "use_post_quant_conv", self.use_post_quant_conv)
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must divide by {self.norm_num_groups}")

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)  # f: 8 for SD

    @classmethod
    def from_diffusers(cls, cfg: dict, sd3: bool = False) -> VAEConfig:
        """Read a diffusers `vae/config.json`; absent keys take AutoencoderKL's defaults. `sd3`: SD 3's VAE
        (shift_factor, no quant convs) is welcome; the SD 1.x/2.x and SDXL pipelines refuse it."""
        sd3_fields = {"shift_factor": None, "use_quant_conv": True, "use_post_quant_conv": True}
        for key, default in {"act_fn": "silu", "mid_block_add_attention": True, "latents_mean": None,
                             "latents_std": None, **({} if sd3 else sd3_fields)}.items():
            if cfg.get(key, default) != default:
                raise ValueError(f"unsupported VAE config {key}={cfg[key]!r} (not an SD 1.x/2.x KL-VAE)")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != want for t in as_tuple("VAEConfig", key, cfg.get(key, [want]))):
                raise ValueError(f"unsupported VAE {key} {cfg[key]}")
        return cls(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                   latent_channels=cfg.get("latent_channels", 4),
                   block_out_channels=as_tuple("VAEConfig", "block_out_channels", cfg.get("block_out_channels", (64,))),
                   layers_per_block=cfg.get("layers_per_block", 1), norm_num_groups=cfg.get("norm_num_groups", 32),
                   scaling_factor=cfg.get("scaling_factor", 0.18215), sample_size=cfg.get("sample_size", 32),
                   force_upcast=cfg.get("force_upcast", True), shift_factor=cfg.get("shift_factor"),
                   use_quant_conv=cfg.get("use_quant_conv", True),
                   use_post_quant_conv=cfg.get("use_post_quant_conv", True))

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": list(self.block_out_channels),
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                "in_channels": self.in_channels, "out_channels": self.out_channels,
                "latent_channels": self.latent_channels, "layers_per_block": self.layers_per_block,
                "norm_num_groups": self.norm_num_groups, "sample_size": self.sample_size,
                "scaling_factor": self.scaling_factor, "force_upcast": self.force_upcast} | self._sd3_fields()

    def _sd3_fields(self) -> dict:
        """SD 3's fields, written only when set: SD 1.x / SDXL configs stay as they were."""
        out = {} if self.shift_factor is None else {"shift_factor": self.shift_factor}
        return out | {k: False for k in ("use_quant_conv", "use_post_quant_conv") if not getattr(self, k)}


class DiagonalGaussian:
    """q(z|x) = N(μ, diag σ²), from the encoder's 2Z channels [μ, log σ²]."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, Z, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)      # as LDM: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)
        self.var = self.std**2

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """The reparameterisation trick: z = μ + σ·ε, ε ~ N(0, I), differentiable in μ and σ."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(N(μ, σ²) ‖ N(0, 1)) = ½ Σ (μ² + σ² − 1 − log σ²), summed over C, h, w: (B,)."""
        return 0.5 * (self.mean**2 + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class SpatialSelfAttention(Attention):
    """Single-head self-attention over all h·w positions, with its own GroupNorm and residual.
    The VAE's only attention, in the mid block. (LDM stored q/k/v/proj_out as 1×1 convs.)"""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, dim_head=channels, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, L, C)
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class VAEMidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, None, groups, 1e-6) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(ch, groups)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, 1e-6)
                                      for i in range(n)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)]) if down else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, 1e-6)
                                      for i in range(n)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if up else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    """x (B,3,H,W) -> moments (B, 2Z, h, w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([EncoderBlock(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block, g,
                                                       down=i < n - 1) for i in range(n)])
        self.mid_block = VAEMidBlock(chs[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """z₀ (B, Z, h, w) -> x̂ (B, 3, H, W)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = VAEMidBlock(chs[0], g)
        self.up_blocks = nn.ModuleList([DecoderBlock(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block + 1, g,
                                                     up=i < n - 1) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        Z = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * Z, 2 * Z, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(Z, Z, 1) if cfg.use_post_quant_conv else None

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        """SD 3's latent shift (0 for SD 1.x and SDXL): z = scaling_factor · (z₀ − shift_factor)."""
        return self.config.shift_factor or 0.0

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_out.weight.device

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x in [-1, 1], (B, 3, H, W) -> q(z₀|x), z₀ (B, Z, H/f, W/f), *unscaled*."""
        moments = self.encoder(x)
        return DiagonalGaussian(self.quant_conv(moments) if self.quant_conv is not None else moments)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents z₀ (B, Z, h, w) -> image in about [-1, 1], (B, 3, h·f, w·f)."""
        return self.decoder(self.post_quant_conv(z) if self.post_quant_conv is not None else z)

    def tiled_decode(self, z: Tensor, tile: int | None = None, overlap: float = 0.25) -> Tensor:
        """Decode a large latent in overlapping tiles (memory ∝ one tile, not the whole picture).

        Tiles of `tile` latent pixels (default: the VAE's native size, 64 for SD = 512 px) step by
        tile·(1 − overlap); where two decoded tiles overlap they are blended with linear ramps, so no
        seam shows. Not bit-equal to `decode` (each tile's GroupNorm sees only its tile), but close.
        """
        f = self.config.downsampling
        tile = tile or max(self.config.sample_size // f, 8)
        B, _, h, w = z.shape
        if h <= tile and w <= tile:
            return self.decode(z)
        stride = max(int(tile * (1 - overlap)), 1)
        ys = list(range(0, max(h - tile, 0) + 1, stride))
        xs = list(range(0, max(w - tile, 0) + 1, stride))
        ys += [h - tile] if ys[-1] != max(h - tile, 0) else []
        xs += [w - tile] if xs[-1] != max(w - tile, 0) else []
        out = torch.zeros(B, self.config.out_channels, h * f, w * f, device=z.device, dtype=z.dtype)
        weight = torch.zeros(1, 1, h * f, w * f, device=z.device, dtype=z.dtype)
        ramp = torch.ones(min(tile, h) * f, min(tile, w) * f, device=z.device, dtype=z.dtype)
        edge = (tile - stride) * f
        if edge > 0:  # linear ramps over the overlap on every side: weights sum to 1 after normalising
            r = torch.linspace(1 / edge, 1, edge, device=z.device, dtype=z.dtype)
            ramp[:edge] *= r[:, None]
            ramp[-edge:] *= r.flip(0)[:, None]
            ramp[:, :edge] *= r
            ramp[:, -edge:] *= r.flip(0)
        for y in ys:
            for x in xs:
                piece = self.decode(z[:, :, y:y + tile, x:x + tile])
                out[:, :, y * f:y * f + piece.shape[2], x * f:x * f + piece.shape[3]] += piece * ramp
                weight[:, :, y * f:y * f + piece.shape[2], x * f:x * f + piece.shape[3]] += ramp
        return out / weight

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior
