"""Training a ControlNet on the frozen tiny model: objects placed where an edge map (or a mask) says.

    trainable  the encoder copy, the hint encoder and the zero convs (ControlNet.from_unet)
    data       (control map, picture, caption); captions that never say where things are, half of them
               dropped to "" (Zhang et al. 2023, §3.3): only the map can tell the layout
    saved      a diffusers ControlNetModel folder
    processes  one, or N under torchrun: each batch drawn whole, each process its share (dist.py)

config → data → model → loop → save, in `train_controlnet`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from . import world
from .adapter_config import AdapterConfig, draw_captions, finish, latent_batch, render_and_encode, start
from .loop import Steps, diffusion_loss, lr_at, optimiser_step, resume, seeded, use_bf16
from ..adapters.controlnet import ControlNet, save_controlnet

CAPTION_DROPOUT = 0.5  # half the captions empty, whatever --caption-dropout says (the paper's 50%)


def controlnet_scenes(cfg: AdapterConfig) -> list[world.Scene]:
    return [world.make_scene(60_000_000 + cfg.seed * 1_000_000 + i) for i in range(cfg.n_images)]


class _Controlled(torch.nn.Module):
    """U-Net + ControlNet as one ε_θ(z_t, t, c): the ControlNet's residuals fed to the U-Net."""

    def __init__(self, unet, controlnet: ControlNet, hint: torch.Tensor):
        super().__init__()
        self.unet, self.controlnet, self.hint = unet, controlnet, hint

    def forward(self, z_t, t, context, control=None):
        return self.unet(z_t, t, context, control=self.controlnet(z_t, t, context, self.hint))


def train_controlnet(cfg: AdapterConfig, force: bool = False) -> Path:
    """The ControlNet loop; returns the folder the ControlNet was saved to."""
    out, work, log, pipe, dist = start(cfg, force)
    device, t0 = pipe.device, time.time()
    scenes = controlnet_scenes(cfg)
    _, means, stds = render_and_encode(pipe, scenes, log, t0)
    controls = torch.stack([world.to_tensor(world.control_map(s, cfg.control)) * 0.5 + 0.5 for s in scenes])  # [0, 1]

    # the hint encoder halves the resolution once per VAE downsampling: pixels -> the latent grid
    hint = tuple(16 * 2**i for i in range(int(math.log2(pipe.vae.config.downsampling)) + 1))
    with seeded(cfg.seed):  # the hint encoder's first convs start random: the same for the same seed
        controlnet = ControlNet.from_unet(pipe.unet, hint).to(device)
    controlnet.requires_grad_(True).train()
    log(f"ControlNet with hint encoder {hint}: {sum(p.numel() for p in controlnet.parameters()):,} trainable parameters")
    params = list(controlnet.parameters())
    opt = torch.optim.AdamW([{"params": params, "lr_scale": 1.0}], lr=cfg.lr, weight_decay=0.01)
    step0, losses = resume(work / "controlnet.pt", log, model=controlnet, opt=opt)

    alpha_bar = pipe.scheduler.alphas_cumprod().to(device)
    rng, g = np.random.default_rng(cfg.seed + step0), torch.Generator().manual_seed(cfg.seed + step0)
    bf16 = use_bf16(cfg.bf16, device)
    log(f"controlnet: {'bfloat16 autocast' if bf16 else 'float32'}")
    state = lambda: dict(model=controlnet.state_dict(), opt=opt.state_dict())  # noqa: E731  what a checkpoint holds
    steps = Steps("controlnet", step0, cfg.steps, log, work / "controlnet.pt", cfg.checkpoint_minutes, losses,
                  dist.is_main)
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup) * group["lr_scale"]
        # the whole batch drawn as one process draws it, then this process's share of every draw
        idx = torch.randint(0, len(scenes), (cfg.batch,), generator=g)
        z0 = dist.share(latent_batch(pipe, means, stds, idx, g))
        captions = draw_captions(scenes, idx, rng, CAPTION_DROPOUT, positions=False)  # only the map knows where
        with torch.no_grad():
            context = pipe.text_encoder(pipe.tokenizer(dist.share(captions), warn=False).to(device))
        t = dist.share(torch.randint(0, len(alpha_bar), (cfg.batch,), generator=g)).to(device)
        eps = dist.share(torch.randn((cfg.batch, *z0.shape[1:]), generator=g)).to(device)
        controlled = _Controlled(pipe.unet, controlnet, controls[dist.share(idx)].to(device))  # it sees the U-Net's z_t
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # the weights stay fp32
            loss = diffusion_loss(controlled, z0, t, eps, context, alpha_bar, cfg.min_snr_gamma)
        optimiser_step(loss, opt, params, dist=dist)
        steps.record(step, dist.all_mean(loss).item(), opt.param_groups[0]["lr"], state)
    steps.finish(state)

    if dist.is_main:
        save_controlnet(controlnet.eval(), out)
    return finish(cfg, out, work, log, t0, dist, steps.seconds_per_step)
