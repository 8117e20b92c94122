"""Training a 9-channel inpainting U-Net from the tiny model, as SD's inpainting model was made.

    trainable  the whole U-Net, its first conv widened from 4 to 9 input channels (z_t, the mask, the masked
               picture's latents), the 5 new ones zero-initialised, so it starts as the base model (as
               runwayml's SD inpainting model was made from SD 1.2)
    data       pictures with random masks (boxes, an object's box, or everything: 25%)
    saved      a whole diffusers pipeline folder, fp16
    processes  one, or N under torchrun: each batch drawn whole, each process its share (dist.py)

config → data → model → loop → save, in `train_inpaint`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .adapter_config import AdapterConfig, draw_captions, finish, latent_batch, render_and_encode, start
from .loop import Steps, diffusion_loss, lr_at, optimiser_step, resume, seeded, use_bf16
from ..models.unet import UNet


def inpaint_scenes(cfg: AdapterConfig) -> list[world.Scene]:
    return [world.make_scene(80_000_000 + cfg.seed * 1_000_000 + i) for i in range(cfg.n_images)]


def random_masks(scenes: list[world.Scene], idx: list[int], rng: np.random.Generator) -> torch.Tensor:
    """(B, 1, 64, 64) of 0/1, white = repaint: a quarter everything (the model must still draw from
    text alone), half one object's box grown by a few pixels (repaint an object), a quarter a random box."""
    masks = torch.zeros(len(idx), 1, world.SIZE, world.SIZE)
    for b, i in enumerate(idx):
        r = rng.random()
        if r < 0.25:
            masks[b] = 1
            continue
        if r < 0.75:
            x0, y0, x1, y1 = scenes[i].objects[int(rng.integers(len(scenes[i].objects)))].bbox
            grow = int(rng.integers(2, 7))
            x0, y0, x1, y1 = x0 - grow, y0 - grow, x1 + grow, y1 + grow
        else:
            w, h = rng.integers(12, 48, size=2)
            x0, y0 = int(rng.integers(0, world.SIZE - w)), int(rng.integers(0, world.SIZE - h))
            x1, y1 = x0 + int(w), y0 + int(h)
        masks[b, :, max(y0, 0):y1, max(x0, 0):x1] = 1
    return masks


def inpainting_unet(unet: UNet) -> UNet:
    """The base U-Net with 9 input channels: conv_in's new weights are zero, so at the start it ignores
    the mask and masked picture and predicts exactly what the base model does."""
    new = UNet(replace(unet.config, in_channels=9)).to(unet.conv_in.weight.device)
    state = unet.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, torch.zeros(w.shape[0], 5, *w.shape[2:], dtype=w.dtype, device=w.device)], 1)
    new.load_state_dict(state)  # strict: every weight is the base model's
    return new


class _Inpainting(torch.nn.Module):
    """The 9-channel U-Net as ε_θ(z_t, t, c): the mask and masked-picture latents ride along on channels."""

    def __init__(self, unet, extra: torch.Tensor):
        super().__init__()
        self.unet, self.extra = unet, extra

    def forward(self, z_t, t, context, control=None):
        return self.unet(torch.cat([z_t, self.extra], dim=1), t, context)


def train_inpaint(cfg: AdapterConfig, force: bool = False) -> Path:
    """The inpainting loop; returns the folder the inpainting pipeline was saved to."""
    out, work, log, pipe, dist = start(cfg, force)
    device, t0 = pipe.device, time.time()
    scenes = inpaint_scenes(cfg)
    images, means, stds = render_and_encode(pipe, scenes, log, t0)

    with seeded(cfg.seed):  # every weight is then overwritten by the base model's
        unet = inpainting_unet(pipe.unet)
    unet.requires_grad_(True).train()
    log(f"inpainting U-Net: conv_in 4 -> 9 input channels, {sum(p.numel() for p in unet.parameters()):,} "
        f"trainable parameters")
    params = list(unet.parameters())
    first = {id(p) for p in unet.conv_in.parameters()}  # the new input channels start at zero: 10× the rate
    groups = [{"params": [p for p in params if id(p) not in first], "lr_scale": 1.0},
              {"params": list(unet.conv_in.parameters()), "lr_scale": 10.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.01)
    step0, losses = resume(work / "inpaint.pt", log, model=unet, opt=opt)

    alpha_bar = pipe.scheduler.alphas_cumprod().to(device)
    rng, g = np.random.default_rng(cfg.seed + step0), torch.Generator().manual_seed(cfg.seed + step0)
    bf16 = use_bf16(cfg.bf16, device)
    log(f"inpaint: {'bfloat16 autocast' if bf16 else 'float32'}")
    f = pipe.vae.config.downsampling
    state = lambda: dict(model=unet.state_dict(), opt=opt.state_dict())  # noqa: E731  what a checkpoint holds
    steps = Steps("inpaint", step0, cfg.steps, log, work / "inpaint.pt", cfg.checkpoint_minutes, losses, dist.is_main)
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup) * group["lr_scale"]
        # the whole batch drawn as one process draws it, then this process's share of every draw
        idx = torch.randint(0, len(scenes), (cfg.batch,), generator=g)
        z0 = dist.share(latent_batch(pipe, means, stds, idx, g))
        captions = draw_captions(scenes, idx, rng, cfg.caption_dropout)
        with torch.no_grad():
            context = pipe.text_encoder(pipe.tokenizer(dist.share(captions), warn=False).to(device))
        t = dist.share(torch.randint(0, len(alpha_bar), (cfg.batch,), generator=g)).to(device)
        eps = dist.share(torch.randn((cfg.batch, *z0.shape[1:]), generator=g)).to(device)
        # what the pipeline feeds it: the mask, and a draw of the masked picture's latents (post.sample(g), drawn
        # for the whole batch)
        mask = dist.share(random_masks(scenes, idx.tolist(), rng))
        with torch.no_grad():
            post = pipe.vae.encode((images[dist.share(idx)] * (mask < 0.5)).to(device))
            noise = torch.randn((cfg.batch, *post.mean.shape[1:]), generator=g)
            masked = post.mean + post.std * dist.share(noise).to(post.mean)
        mask_latent = F.interpolate(mask, size=(world.SIZE // f, world.SIZE // f)).to(device)
        model = _Inpainting(unet, torch.cat([mask_latent, masked * pipe.vae.scaling_factor], dim=1))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # the weights stay fp32
            loss = diffusion_loss(model, z0, t, eps, context, alpha_bar, cfg.min_snr_gamma)
        optimiser_step(loss, opt, params, dist=dist)
        steps.record(step, dist.all_mean(loss).item(), opt.param_groups[0]["lr"], state)
    steps.finish(state)

    if dist.is_main:
        pipe.unet = unet.eval()
        pipe.to(dtype=torch.float16)  # shipped in fp16, as the base model
        pipe.save_pretrained(out)
    return finish(cfg, out, work, log, t0, dist, steps.seconds_per_step)
