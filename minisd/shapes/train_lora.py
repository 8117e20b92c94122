"""Teaching the frozen tiny model a new shape (`star`, never in its training data) with a LoRA.

    trainable  A, B (W' = W + (α/r)·BA) on every Linear and Conv2d of the U-Net (attention, feed-forward,
               the ResBlocks' convs, ...: LoCon's "all layers"), optionally the text encoder's
    data       half pictures of the new concept, half ordinary scenes (prior preservation, as DreamBooth
               does: the other shapes must stay right)
    loss       weighted onto a star's notches and every object's outline (loss_weights)
    saved      fp16, in the diffusers/PEFT and the kohya (A1111) layouts
    processes  one, or N under torchrun: each batch drawn whole, each process its share (dist.py)

config → data → model → loop → save, in `train_lora`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .adapter_config import AdapterConfig, draw_captions, finish, latent_batch, render_and_encode, start
from .loop import Steps, diffusion_loss, edge_map, lr_at, optimiser_step, resume, seeded, use_bf16
from ..adapters import lora as lora_lib


def lora_scenes(cfg: AdapterConfig) -> list[world.Scene]:
    """Half the scenes made of the concept only, half ordinary (base shapes): learn one, forget none."""
    rng_seed = 50_000_000 + cfg.seed * 1_000_000  # far from the base training seeds
    return [world.make_scene(rng_seed + i, shapes=(cfg.concept,) if i % 2 == 0 else world.BASE_SHAPES)
            for i in range(cfg.n_images)]


def concept_data(cfg: AdapterConfig, pipe, log, t0: float):
    """The concept's pictures alone (the concept half of `lora_scenes`), rendered and encoded, with their loss
    weights (None for the plain loss): (scenes, means, stds, weights), for textual inversion and DreamBooth."""
    scenes = [s for i, s in enumerate(lora_scenes(cfg)) if i % 2 == 0]
    images, means, stds = render_and_encode(pipe, scenes, log, t0)
    weights = None
    if cfg.notch_weight or cfg.outline_weight:
        weights = loss_weights(scenes, images, means.shape[-1], cfg.notch_weight, cfg.outline_weight, log)
    return scenes, means, stds, weights


def loss_weights(scenes: list[world.Scene], images: torch.Tensor, side: int, notch: float, outline: float,
                 log=print) -> torch.Tensor:
    """(N, 1, side, side): each latent cell's weight in the LoRA's loss (AdapterConfig.notch_weight): 1 + notch ·
    its share of notch + outline · its share of outline, scaled to average 1 over each picture."""
    notches = torch.from_numpy(np.stack([world.notches(s, side) for s in scenes]))[:, None]
    outlines = F.avg_pool2d(edge_map(images), images.shape[-1] // side)
    w = 1 + notch * notches + outline * outlines
    notched = int((notches.flatten(1) > 0).any(1).sum())
    log(f"loss weights: 1 + {notch:g} · notch + {outline:g} · outline, averaging 1 a picture; {notched} of "
        f"{len(scenes)} pictures with notches, {notches.sum() / len(scenes):.1f} notch and "
        f"{outlines.sum() / len(scenes):.1f} outline cells a picture")
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


def add_loras(cfg: AdapterConfig, pipe, log) -> tuple[dict, dict, torch.nn.ModuleDict]:
    """LoRAs of rank cfg.rank on cfg.targets of the U-Net (and cfg.te_targets of the text encoder), A drawn from
    cfg.seed, B zero: (U-Net loras, text-encoder loras, all of them as one module to checkpoint)."""
    roots = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    with seeded(cfg.seed):  # A starts random (B at zero): the same A for the same seed
        loras = lora_lib.inject(roots, "train", cfg.rank, cfg.alpha, cfg.targets.split(","))
        te_loras = (lora_lib.inject(roots, "train", cfg.rank, cfg.alpha, cfg.te_targets.split(","), root="text_encoder")
                    if cfg.te_targets else {})
    module = torch.nn.ModuleDict({k.replace(".", "/"): v for k, v in {**loras, **te_loras}.items()})
    n_unet = sum(p.numel() for p in pipe.unet.parameters()) - lora_lib.parameter_count(loras)  # the U-Net's own
    log(f"LoRA rank {cfg.rank} on {len(loras)} U-Net layers: {lora_lib.parameter_count(loras):,} trainable "
        f"parameters ({lora_lib.parameter_count(loras) / n_unet:.1%} of the U-Net)"
        + (f", and on {len(te_loras)} text-encoder layers: {lora_lib.parameter_count(te_loras):,}" if te_loras else ""))
    return loras, te_loras, module


def lora_param_groups(cfg: AdapterConfig, module: torch.nn.Module, te_loras: dict) -> tuple[list, list[dict]]:
    """(every trainable parameter, the optimiser's groups): the text encoder's at cfg.te_lr_scale × the rate."""
    params = [p for p in module.parameters() if p.requires_grad]
    te = {id(p) for lo in te_loras.values() for p in lo.parameters()}
    groups = [{"params": [p for p in params if id(p) not in te], "lr_scale": 1.0}]
    if te_loras:
        groups.append({"params": [p for p in params if id(p) in te], "lr_scale": cfg.te_lr_scale})
    return params, groups


def save_loras(cfg: AdapterConfig, out: Path, loras: dict) -> None:
    """The LoRAs in fp16, as the base model and most LoRA files in circulation are: in the diffusers/PEFT layout
    (out/pytorch_lora_weights.safetensors) and the kohya (A1111) one (out/<out's name>_kohya.safetensors)."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"minisd_concept": cfg.concept, "ss_base_model_version": "minisd_tiny"}
    lora_lib.save_lora(loras, out, "peft", meta, torch.float16)
    lora_lib.save_lora(loras, out / f"{out.name}_kohya.safetensors", "kohya", meta, torch.float16)


def train_lora(cfg: AdapterConfig, force: bool = False) -> Path:
    """The LoRA loop; returns the folder the LoRA was saved to."""
    out, work, log, pipe, dist = start(cfg, force)
    device, t0 = pipe.device, time.time()
    scenes = lora_scenes(cfg)
    images, means, stds = render_and_encode(pipe, scenes, log, t0)

    loras, te_loras, module = add_loras(cfg, pipe, log)
    weights = None  # the loss weight per latent cell (loss_weights); None: the plain loss
    if cfg.notch_weight or cfg.outline_weight:
        weights = loss_weights(scenes, images, means.shape[-1], cfg.notch_weight, cfg.outline_weight, log)
    params, groups = lora_param_groups(cfg, module, te_loras)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    step0, losses = resume(work / "lora.pt", log, model=module, opt=opt)

    alpha_bar = pipe.scheduler.alphas_cumprod().to(device)
    rng, g = np.random.default_rng(cfg.seed + step0), torch.Generator().manual_seed(cfg.seed + step0)
    bf16 = use_bf16(cfg.bf16, device)
    log(f"lora: {'bfloat16 autocast' if bf16 else 'float32'}")
    state = lambda: dict(model=module.state_dict(), opt=opt.state_dict())  # noqa: E731  what a checkpoint holds
    steps = Steps("lora", step0, cfg.steps, log, work / "lora.pt", cfg.checkpoint_minutes, losses, dist.is_main)
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup) * group["lr_scale"]
        # the whole batch drawn as one process draws it, then this process's share of every draw
        idx = torch.randint(0, len(scenes), (cfg.batch,), generator=g)
        z0 = dist.share(latent_batch(pipe, means, stds, idx, g))
        captions = dist.share(draw_captions(scenes, idx, rng, cfg.caption_dropout))
        with torch.set_grad_enabled(bool(te_loras)):  # the text encoder is frozen unless it has LoRAs
            context = pipe.text_encoder(pipe.tokenizer(captions, warn=False).to(device))
        t = dist.share(torch.randint(0, len(alpha_bar), (cfg.batch,), generator=g)).to(device)
        eps = dist.share(torch.randn((cfg.batch, *z0.shape[1:]), generator=g)).to(device)
        weight = None if weights is None else weights[dist.share(idx)].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # the weights stay fp32
            loss = diffusion_loss(pipe.unet, z0, t, eps, context, alpha_bar, cfg.min_snr_gamma, weight=weight)
        optimiser_step(loss, opt, params, dist=dist)
        steps.record(step, dist.all_mean(loss).item(), opt.param_groups[0]["lr"], state)
    steps.finish(state)

    if dist.is_main:
        save_loras(cfg, out, {**loras, **te_loras})
    return finish(cfg, out, work, log, t0, dist, steps.seconds_per_step)
