"""ControlNet (Zhang, Rao & Agrawala 2023): steer a frozen U-Net with a picture — edges, a mask, a pose.

A trainable copy of the U-Net's encoder (conv_in, time embedding, down blocks, mid block) reads the
noisy latents plus the control image, and its features are added to the frozen U-Net's skip
connections through 1×1 convolutions that start at zero:

    c_f      = hint encoder(control image)                      (B, C₀, h, w): pixels -> latent grid
    x₀       = conv_in(z_t) + c_f
    skips    = encoder copy(x₀, t, context)                     one per U-Net skip, plus the mid output
    residual = zero_conv_i(skip_i)                              zero at the start: nothing changes
    U-Net    : skip_i ← skip_i + scale · residual_i,  mid ← mid + scale · residual_mid   (paper eq. 4)

Because the zero convs start at zero, a fresh ControlNet leaves the U-Net's output exactly as it
was, and training starts from the U-Net's own knowledge instead of from noise.

Module names follow diffusers' `ControlNetModel`, so its files load with no key map; original
lllyasviel files (`control_model.input_hint_block…`, `zero_convs`, `middle_block_out`) are converted
by `convert_original` with the U-Net's own prefix table.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diffusion.denoisers import timesteps_on_device
from ..formats import weights
from ..nn.layers import TimestepEmbedding, timestep_embedding
from ..models.unet import DownBlock, MidBlock, UNet, UNetConfig, text_time_embedding


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)  # the encoder it copies
    # the hint encoder's widths; each step after the first halves the resolution (SD: 512 px -> 64)
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    conditioning_channels: int = 3
    global_pool_conditions: bool = False   # the "shuffle" ControlNet: residuals averaged over space

    @classmethod
    def from_diffusers(cls, cfg: dict) -> ControlNetConfig:
        if cfg.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
            raise ValueError("controlnet_conditioning_channel_order 'bgr' is not supported")
        unet_cfg = dict(cfg)
        down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        unet_cfg["up_block_types"] = ["CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D"
                                      for t in reversed(down)]
        return cls(unet=UNetConfig.from_diffusers(unet_cfg),
                   conditioning_embedding_out_channels=tuple(cfg.get("conditioning_embedding_out_channels",
                                                                     (16, 32, 96, 256))),
                   conditioning_channels=cfg.get("conditioning_channels", 3),
                   global_pool_conditions=cfg.get("global_pool_conditions", False))

    def to_diffusers(self) -> dict:
        cfg = self.unet.to_diffusers()
        for key in ("up_block_types", "out_channels", "center_input_sample", "sample_size"):
            cfg.pop(key, None)
        cfg.update({"_class_name": "ControlNetModel",
                    "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
                    "conditioning_channels": self.conditioning_channels,
                    "controlnet_conditioning_channel_order": "rgb",
                    "global_pool_conditions": self.global_pool_conditions})
        return cfg

    @property
    def downscale(self) -> int:
        """Pixels per latent cell the hint encoder assumes (8 for SD's VAE, 4 for the tiny model's)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


class ControlNetConditioningEmbedding(nn.Module):
    """The hint encoder: a few 3×3 convs with SiLU, stride 2 between widths, then a zero-init conv
    to the U-Net's first width. 512×512×3 -> 64×64×320 for SD 1.5."""

    def __init__(self, out_channels: int, widths: tuple[int, ...], in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = zero(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        x = F.silu(self.conv_in(x))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# ControlNet.from_unet: the parameters copied from the U-Net (same names), and the ControlNet's own
COPIED_FROM_UNET = ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")
ADDED = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
ZERO_INITIALISED = ("controlnet_cond_embedding.conv_out.", "controlnet_down_blocks.", "controlnet_mid_block.")


class ControlNet(nn.Module):
    """(z_t, t, context, control image in [0, 1]) -> (down residuals, mid residual) for `UNet(control=…)`."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        u = cfg.unet
        chs, n = u.block_out_channels, len(u.block_out_channels)
        self.conv_in = nn.Conv2d(u.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], u.time_dim)
        if u.addition_embed_type == "text_time":  # an SDXL ControlNet reads the pooled text and size ids too
            self.add_embedding = TimestepEmbedding(u.projection_class_embeddings_input_dim, u.time_dim)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            chs[0], cfg.conditioning_embedding_out_channels, cfg.conditioning_channels)
        depths = u.depths
        self.down_blocks = nn.ModuleList([
            DownBlock(chs[max(i - 1, 0)], chs[i], u.num_heads[i], u.cross_attention[i], i == n - 1, u, depths[i])
            for i in range(n)])
        self.mid_block = MidBlock(chs[-1], u.num_heads[-1], u, depths[-1])
        # one zero conv per U-Net skip tensor: conv_in, then each resnet and downsampler of the down path
        skip_chs = [chs[0]]
        for i in range(n):
            skip_chs += [chs[i]] * u.layers_per_block + ([chs[i]] if i < n - 1 else [])
        self.controlnet_down_blocks = nn.ModuleList([zero(nn.Conv2d(c, c, 1)) for c in skip_chs])
        self.controlnet_mid_block = zero(nn.Conv2d(chs[-1], chs[-1], 1))

    @classmethod
    def from_unet(cls, unet: UNet, conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                  conditioning_channels: int = 3) -> ControlNet:
        """A ControlNet whose encoder starts as a copy of `unet`'s, and whose zero convs make it a no-op.

        Every parameter is accounted for: those under COPIED_FROM_UNET take the U-Net's tensor of the same
        name (strict: each must exist there with the same shape), those under ADDED are the ControlNet's own
        (the hint encoder, fresh, and the zero convs, which must be zero)."""
        cn = cls(ControlNetConfig(unet.config, tuple(conditioning_embedding_out_channels), conditioning_channels))
        own, source = cn.state_dict(), unet.state_dict()
        copied = [k for k in own if k.startswith(COPIED_FROM_UNET)]
        stray = [k for k in own if not k.startswith(COPIED_FROM_UNET + ADDED)]
        missing = [k for k in copied if k not in source or source[k].shape != own[k].shape]
        if stray or missing:
            raise weights.WeightsError(f"ControlNet.from_unet: {len(missing)} encoder weights not in the U-Net "
                                       f"(or of another shape) {missing[:3]}, {len(stray)} unaccounted for {stray[:3]}")
        cn.load_state_dict({**own, **{k: source[k] for k in copied}})  # strict: every key, every shape
        not_zero = [k for k in own if k.startswith(ZERO_INITIALISED) and own[k].any()]
        assert not not_zero, f"zero convs that are not zero: {not_zero[:3]}"
        return cn.to(device=unet.device, dtype=unet.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(self, z_t: Tensor, t: Tensor | float, context: Tensor, control_image: Tensor,
                scale: float | list[float] = 1.0, pooled: Tensor | None = None,
                time_ids: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """control_image (B, 3, H, W) in [0, 1], H = h·downscale. `scale`: one number, or one per residual
        (guess mode's 0.1 → 1.0 ramp). `pooled`, `time_ids`: an SDXL ControlNet's added conditions, as the
        U-Net's."""
        B = z_t.shape[0]
        t = torch.as_tensor(t, device=z_t.device).reshape(-1)
        t = t.expand(B) if t.numel() == 1 else t
        u = self.config.unet
        emb = self.time_embedding(timestep_embedding(t, u.block_out_channels[0], u.flip_sin_to_cos,
                                                     u.freq_shift).to(z_t.dtype))
        if u.addition_embed_type == "text_time":
            emb = emb + text_time_embedding(self.add_embedding, u, pooled, time_ids, B)
        x = self.conv_in(z_t) + self.controlnet_cond_embedding(control_image.to(z_t.dtype))
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips += block_skips
        x = self.mid_block(x, emb, context)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        scales = scale if isinstance(scale, (list, tuple)) else [scale] * (len(down) + 1)
        down = [r * s for r, s in zip(down, scales[:-1])]
        mid = mid * scales[-1]
        if self.config.global_pool_conditions:
            down = [r.mean(dim=(2, 3), keepdim=True) for r in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


# ─── files ─────────────────────────────────────────────────────────────────────────────────────────

def original_prefix_table(cfg: ControlNetConfig) -> list[tuple[str, str, dict]]:
    """LDM (lllyasviel cldm) module -> diffusers module: the U-Net encoder's rows plus the hint
    encoder (`input_hint_block.{0,2,…,14}`, SiLUs at the odd indices) and the zero convs."""
    table = [row for row in weights.unet_prefix_table(cfg.unet)
             if row[1].startswith(("time_embedding", "conv_in", "down_blocks", "mid_block"))]
    n_hint = 2 * len(cfg.conditioning_embedding_out_channels) - 2  # convs between conv_in and conv_out
    table.append(("input_hint_block.0", "controlnet_cond_embedding.conv_in", {}))
    table += [(f"input_hint_block.{2 * (k + 1)}", f"controlnet_cond_embedding.blocks.{k}", {}) for k in range(n_hint)]
    table.append((f"input_hint_block.{2 * (n_hint + 1)}", "controlnet_cond_embedding.conv_out", {}))
    n_skips = 1 + sum(cfg.unet.layers_per_block + (i < len(cfg.unet.block_out_channels) - 1)
                      for i in range(len(cfg.unet.block_out_channels)))
    table += [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}", {}) for i in range(n_skips)]
    table.append(("middle_block_out.0", "controlnet_mid_block", {}))
    return table


def is_original(sd: dict) -> bool:
    return any(k.startswith(("control_model.", "input_hint_block.")) for k in sd)


def convert_original(sd: dict, cfg: ControlNetConfig, source: str) -> dict:
    """An lllyasviel ControlNet state dict (with or without the `control_model.` prefix) -> diffusers keys."""
    if any(k == "difference" or k.endswith(".difference") for k in sd):
        raise weights.WeightsError(f"{source}: a 'difference' ControlNet (to be added to a base U-Net) is not supported")
    if any(k.startswith("control_model.") for k in sd):
        sd = {k.removeprefix("control_model."): v for k, v in sd.items() if k.startswith("control_model.")}
    return weights._rename(sd, original_prefix_table(cfg), source)


def _infer_config(sd: dict, base: UNetConfig) -> ControlNetConfig:
    """A ControlNetConfig from the tensor shapes of a diffusers-layout state dict (single files have no
    config.json): widths from conv_in and the hint encoder, the rest from the U-Net it belongs to."""
    hint = [sd["controlnet_cond_embedding.conv_in.weight"].shape[0]]
    k = 1
    while f"controlnet_cond_embedding.blocks.{k}.weight" in sd:
        hint.append(sd[f"controlnet_cond_embedding.blocks.{k}.weight"].shape[0])
        k += 2
    n = sum(1 for key in sd if key.startswith("controlnet_down_blocks.") and key.endswith(".weight"))
    levels = sum(1 for i in range(16) if f"down_blocks.{i}.resnets.0.conv1.weight" in sd)
    chs = tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels))
    cross = tuple(f"down_blocks.{i}.attentions.0.proj_in.weight" in sd for i in range(levels))
    layers = sum(1 for j in range(16) if f"down_blocks.0.resnets.{j}.conv1.weight" in sd)
    if n != 1 + levels * layers + levels - 1:
        raise weights.WeightsError(f"ControlNet with {n} zero convs does not match {levels} levels × {layers} blocks")
    context = sd["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1] if cross[0] \
        else base.cross_attention_dim
    heads = base.num_heads if len(base.num_heads) == levels else (8,) * levels
    unet = replace(base, in_channels=sd["conv_in.weight"].shape[1], block_out_channels=chs, cross_attention=cross,
                   layers_per_block=layers, num_heads=heads, cross_attention_dim=context,
                   use_linear_projection=cross[0] and sd["down_blocks.0.attentions.0.proj_in.weight"].ndim == 2)
    return ControlNetConfig(unet, tuple(hint), sd["controlnet_cond_embedding.conv_in.weight"].shape[1])


def load_controlnet(source: str | os.PathLike, unet: UNet, device=None, dtype=None) -> ControlNet:
    """A diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.*), a diffusers-layout
    .safetensors, or an original lllyasviel .pth/.ckpt/.safetensors (pickles read safely)."""
    path = Path(source).expanduser()
    if not path.exists():
        if weights.looks_like_repo_id(str(source)):
            path = weights.download(str(source))
        else:
            raise FileNotFoundError(f"ControlNet {str(source)!r}: no such file or folder, nor a Hub repo id")
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise weights.WeightsError(f"{path}: no config.json — is this a diffusers ControlNetModel folder?")
        import json

        cfg = ControlNetConfig.from_diffusers(json.loads(config_path.read_text()))
        files = weights.find_weights(path, ("diffusion_pytorch_model",), None)
        sd = {}
        for f in files:
            sd.update(weights.read_state_dict(f))
        source_name = str(path)
    else:
        sd = weights.read_state_dict(path)
        source_name = str(path)
        if is_original(sd):
            probe = ControlNetConfig(unet.config, _hint_widths_original(sd))
            sd = convert_original(sd, probe, source_name)
        cfg = _infer_config(sd, unet.config)
    with torch.device("meta"):
        cn = ControlNet(cfg)
    weights.load_strict(cn, sd, source_name, dtype or unet.dtype, device or unet.device)
    if cfg.unet.block_out_channels != unet.config.block_out_channels or \
            cfg.unet.cross_attention_dim != unet.config.cross_attention_dim:
        raise weights.WeightsError(f"{source_name}: a ControlNet for a U-Net of widths {cfg.unet.block_out_channels} "
                                   f"and context {cfg.unet.cross_attention_dim}, not this model's "
                                   f"{unet.config.block_out_channels} / {unet.config.cross_attention_dim}")
    return cn.eval()


def _hint_widths_original(sd: dict) -> tuple[int, ...]:
    prefix = "control_model." if any(k.startswith("control_model.") for k in sd) else ""
    widths, k = [], 0
    while f"{prefix}input_hint_block.{k}.weight" in sd:
        widths.append(sd[f"{prefix}input_hint_block.{k}.weight"].shape[0])
        k += 2
    # conv_in, then pairs (same width, next width s2), then conv_out to the U-Net width
    return tuple([widths[0]] + widths[2:-1:2]) if len(widths) > 2 else tuple(widths[:1])


def save_controlnet(cn: ControlNet, folder: str | os.PathLike) -> None:
    """A diffusers ControlNetModel folder: config.json + diffusion_pytorch_model.safetensors."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cn.config.to_diffusers(), indent=2))
    weights.write_safetensors({k: v.contiguous() for k, v in cn.state_dict().items()},
                              folder / "diffusion_pytorch_model.safetensors")


__all__ = ["ControlNet", "ControlNetConfig", "load_controlnet", "save_controlnet", "convert_original"]


# ─── generation ────────────────────────────────────────────────────────────────────────────────────

CONTROL_ARGUMENTS = ("control_image", "controlnet_scale", "control_start", "control_end", "guess_mode")


@dataclass(frozen=True)
class ControlOptions:
    """The ControlNet arguments of one generation call (`StableDiffusion.__call__` documents them).
    With several ControlNets, image and scale are lists, one entry per ControlNet."""

    image: object                            # PIL image, list of them, or a tensor in [0, 1]
    scale: float | list[float] = 1.0         # multiplies every residual
    start: float = 0.0                       # fraction of the steps before the ControlNet starts
    end: float = 1.0                         # fraction of the steps after which it stops
    guess_mode: bool = False                 # the ControlNet steers the conditional branch only


def control_image_tensor(image, height: int, width: int, batch: int, device, dtype) -> Tensor:
    """A control image (PIL, list of PIL, or a tensor in [0, 1]) -> (batch, C, H, W) in [0, 1], as
    diffusers prepares it: RGB, resized (Lanczos) to the output size, no normalisation to [-1, 1]."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        arrays = []
        for im in image:
            if not isinstance(im, Image.Image):
                raise TypeError(f"control_image list entries must be PIL images, got {type(im).__name__}")
            im = im.convert("RGB")
            if im.size != (width, height):
                im = im.resize((width, height), Image.LANCZOS)
            arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    elif isinstance(image, Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"a control_image tensor must be in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
        if tuple(x.shape[-2:]) != (height, width):
            raise ValueError(f"control_image is {tuple(x.shape[-2:])} but the output is {(height, width)}")
    else:
        raise TypeError(f"control_image must be a PIL image, a list of them, or a tensor, not {type(image).__name__}")
    if x.shape[0] == 1:
        x = x.repeat(batch, 1, 1, 1)
    elif x.shape[0] != batch:
        raise ValueError(f"{x.shape[0]} control images for a batch of {batch}: give one, or one per image")
    return x.to(device, dtype)


def per_controlnet(options: ControlOptions, n: int) -> tuple[list, list[float]]:
    """One control image and one scale for each of the n ControlNets."""
    if options.image is None:
        raise ValueError("a loaded ControlNet needs control_image=…")
    images = options.image
    if n > 1:
        if not isinstance(images, (list, tuple)) or len(images) != n:
            raise ValueError(f"{n} ControlNets are loaded: give control_image as a list of {n} images")
    else:
        images = [images]
    scales = list(options.scale) if isinstance(options.scale, (list, tuple)) else [options.scale] * n
    if len(scales) != n:
        raise ValueError(f"controlnet_scale has {len(scales)} values for {n} ControlNets")
    if not all(math.isfinite(float(x)) for x in scales):
        raise ValueError(f"controlnet_scale must be finite numbers, got {options.scale!r}")
    return list(images), scales


def control_function(controlnets: list[ControlNet], options: ControlOptions, timesteps: Tensor, batch: int,
                     cfg: bool, height: int, width: int, device, dtype, added: dict[str, Tensor] | None = None):
    """The `residuals(z_in, t, context)` function that `denoisers.with_controlnet` calls before each U-Net
    pass: the sum of every ControlNet's residuals, scaled, or None outside [control_start, control_end].
    t is the schedule's (on the CPU): which step it is costs no wait on the device.

    Guess mode (the original "no prompt" mode): the ControlNets see only the conditional half of the
    CFG batch (the unconditional half gets no residuals), with scales rising 0.1 → 1 from the first skip
    to the mid block, so the control image is followed even without a prompt.

    `added`: an SDXL ControlNet's `pooled` and `time_ids`, one row per row of the batch it is called on
    ([∅, c] under guidance), as the U-Net gets them."""
    images, scales = per_controlnet(options, len(controlnets))
    start, end = float(options.start), float(options.end)
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"need 0 <= control_start < control_end <= 1, got {start} and {end}")
    guess = bool(options.guess_mode)
    prepared = [control_image_tensor(im, height, width, batch, device, dtype) for im in images]
    for cn, im in zip(controlnets, prepared):
        if im.shape[-1] != width or (height // cn.config.downscale) * cn.config.downscale != height:
            raise ValueError(f"control image {tuple(im.shape[-2:])} does not suit a hint encoder of stride "
                             f"{cn.config.downscale}")
    steps = [float(t) for t in timesteps]
    total = len(steps)
    on_device = timesteps_on_device(timesteps, device)

    def keep(t: Tensor) -> float:
        i = min(range(total), key=lambda k: abs(steps[k] - float(t)))  # which step of the schedule this is
        return 1.0 - float(i / total < start or (i + 1) / total > end)

    def control(z_in: Tensor, t: Tensor, context: Tensor):
        k = keep(t)
        if k == 0.0:
            return None
        total_down, total_mid = None, None
        for cn, im, scale in zip(controlnets, prepared, scales):
            z, ctx, img, extra = z_in, context, im, dict(added or {})
            if cfg and not guess:
                img = torch.cat([im, im])
            if cfg and guess:  # the conditional half only
                z, ctx = z_in.chunk(2)[1], context.chunk(2)[1]
                extra = {key: v.chunk(2)[1] for key, v in extra.items()}
            n_res = len(cn.controlnet_down_blocks) + 1
            s = (torch.logspace(-1, 0, n_res) * scale * k).tolist() if guess else scale * k
            down, mid = cn(z.to(cn.dtype), on_device(t), ctx.to(cn.dtype), img.to(cn.dtype), s,
                           **{key: v.to(cn.dtype) for key, v in extra.items()})
            if cfg and guess:
                down = [torch.cat([torch.zeros_like(d), d]) for d in down]
                mid = torch.cat([torch.zeros_like(mid), mid])
            total_down = down if total_down is None else [a + b for a, b in zip(total_down, down)]
            total_mid = mid if total_mid is None else total_mid + mid
        return total_down, total_mid

    return control
