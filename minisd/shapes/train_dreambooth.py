"""DreamBooth (Ruiz et al. 2023): the whole U-Net fine-tuned on pictures of the new concept, with the prior
preserved by the model's own pictures.

    trainable  every weight of the U-Net (the text encoder stays frozen: `star` is already a token of the tiny
               vocabulary that base training never used, a rare identifier as DreamBooth's "sks" is);
               DreamBooth-LoRA (`minisd train dreambooth-lora`, as diffusers' train_dreambooth_lora.py): the
               star LoRA's low-rank updates (train_lora.add_loras) instead, the U-Net itself frozen
    data       the concept's pictures (captions naming it: "a small red star on the left"), and the prior:
               n_class_images pictures the *frozen base model* drew for ordinary prompts ("a blue circle at
               the top"), each kept with the prompt that made it
    loss       L = L_concept + λ · L_prior (λ = prior_loss_weight; Ruiz et al. use 1): the concept's half
               weighted onto notches and outlines as the LoRA's is, the prior's onto outlines
               (prior_outline_weight; 0: plain, as in the paper).
               λ = 0: the concept alone, every picture of the batch, and the model is free to drift
    saved      a whole diffusers pipeline folder, fp16: the base's VAE, text encoder, tokenizer and scheduler
               with the fine-tuned U-Net; DreamBooth-LoRA: the LoRA, in the layouts `minisd train lora` saves

Without the prior the model learns that every object is a star ("language drift"); the prior asks it to keep
drawing for ordinary prompts what it drew before. The head-to-head in docs/adapters.md measures both.

config → data → model → loop → save, in `train_dreambooth`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .adapter_config import AdapterConfig, draw_captions, finish, latent_batch, start
from .loop import (Log, Steps, diffusion_loss, edge_map, load_checkpoint, lr_at, optimiser_step, resume,
                   save_checkpoint, use_bf16)
from .train_lora import add_loras, concept_data, lora_param_groups, save_loras

CLASS_STEPS, CLASS_GUIDANCE = 25, 7.5  # how the base model draws the prior's pictures


@torch.no_grad()
def class_latents(pipe, n: int, seed: int, path: Path, log: Log, main: bool = True) -> tuple[torch.Tensor, list[str]]:
    """The prior: n pictures the frozen base model draws (as final latents, scaled as the U-Net sees them) for
    captions of ordinary scenes, and those captions. Drawn once and kept in `path` (a resumed run reuses them;
    under several processes each draws the same pictures, rank 0 — `main` — keeps them)."""
    saved = load_checkpoint(path)
    if saved is not None and len(saved["latents"]) == n:
        log(f"prior: {n} pictures of the base model read from {path}")
        return saved["latents"], saved["captions"].split("\n")
    t0 = time.time()
    rng = np.random.default_rng(seed)
    scenes = [world.make_scene(60_000_000 + seed * 1_000_000 + i, shapes=world.BASE_SHAPES) for i in range(n)]
    captions = [world.make_caption(s, rng) for s in scenes]
    c = pipe.unet.config
    latents = []
    for i in range(0, n, 50):
        chunk = captions[i:i + 50]
        noise = torch.stack([torch.randn(c.in_channels, c.sample_size, c.sample_size,
                                         generator=torch.Generator().manual_seed(seed * 1_000_000 + i + j))
                             for j in range(len(chunk))])
        latents.append(pipe(chunk, num_inference_steps=CLASS_STEPS, guidance_scale=CLASS_GUIDANCE, sampler="ddim",
                            latents=noise, output_type="latent").float().cpu())
    latents = torch.cat(latents)
    if main:
        save_checkpoint(path, latents=latents, captions="\n".join(captions))
    log(f"prior: {n} pictures drawn by the base model in {time.time() - t0:.0f}s (DDIM {CLASS_STEPS} steps, "
        f"CFG {CLASS_GUIDANCE:g})")
    return latents, captions


@torch.no_grad()
def outline_weights(pipe, latents: torch.Tensor, outline: float) -> torch.Tensor:
    """(N, 1, h, w): the prior's loss weight per latent cell, 1 + outline · its share of outline in the decoded
    picture (`loop.edge_map`), averaging 1 a picture — the LoRA's weights on its ordinary half (there are no
    notches in the base shapes). Without them the concept's half, weighted onto notches and outlines, outpulls
    the prior exactly where shapes are told apart."""
    edges = []
    for i in range(0, len(latents), 100):
        images = pipe.vae.decode(latents[i:i + 100].to(pipe.device) / pipe.vae.scaling_factor).float().cpu()
        edges.append(F.avg_pool2d(edge_map(images), images.shape[-1] // latents.shape[-1]))
    w = 1 + outline * torch.cat(edges)
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


def dreambooth_loss(concept_loss: torch.Tensor, prior_loss: torch.Tensor | None, prior_loss_weight: float) -> torch.Tensor:
    """Ruiz et al.'s objective: L = L_concept + λ · L_prior, each the diffusion loss (`loop.diffusion_loss`) of its
    half of the batch — the concept's pictures, and the base model's own pictures for ordinary prompts. No prior
    (None, or λ = 0): the concept's loss alone."""
    if prior_loss is None or prior_loss_weight == 0:
        return concept_loss
    return concept_loss + prior_loss_weight * prior_loss


def train_dreambooth(cfg: AdapterConfig, force: bool = False) -> Path:
    """The DreamBooth loop (cfg.kind "dreambooth", or "dreambooth-lora"); returns the folder the fine-tuned
    pipeline (or the LoRA) was saved to."""
    out, work, log, pipe, dist = start(cfg, force)
    device, t0 = pipe.device, time.time()
    prior = cfg.prior_loss_weight > 0
    n_prior = cfg.batch // 2 if prior else 0
    n_concept = cfg.batch - n_prior
    prior_w = None  # the prior's loss weights (outline_weights), None: plain
    if prior:
        prior_z, prior_captions = class_latents(pipe, cfg.n_class_images, cfg.seed, work / "prior.pt", log, dist.is_main)
        if cfg.prior_outline_weight:
            prior_w = outline_weights(pipe, prior_z, cfg.prior_outline_weight)
            log(f"prior: loss weights 1 + {cfg.prior_outline_weight:g} · outline, averaging 1 a picture")
    scenes, means, stds, weights = concept_data(cfg, pipe, log, t0)  # pictures of the concept only

    unet, lora = pipe.unet, cfg.kind == "dreambooth-lora"
    if lora:  # low-rank updates on the frozen U-Net (and, with --te-targets, the text encoder)
        loras, te_loras, model = add_loras(cfg, pipe, log)
        params, groups = lora_param_groups(cfg, model, te_loras)
        what = "LoRA"
    else:
        unet.requires_grad_(True).train()
        loras, te_loras, model = {}, {}, unet
        params = list(unet.parameters())
        groups = [{"params": params, "lr_scale": 1.0}]
        what = f"all {sum(p.numel() for p in params):,} U-Net weights"
    log(f"{cfg.kind}: {what} trained; batch {n_concept} of {cfg.concept} + {n_prior} of the prior, "
        f"λ = {cfg.prior_loss_weight:g}")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    checkpoint = work / f"{cfg.kind}.pt"
    step0, losses = resume(checkpoint, log, model=model, opt=opt)

    alpha_bar = pipe.scheduler.alphas_cumprod().to(device)
    rng, g = np.random.default_rng(cfg.seed + step0), torch.Generator().manual_seed(cfg.seed + step0)
    bf16 = use_bf16(cfg.bf16, device)
    state = lambda: dict(model=model.state_dict(), opt=opt.state_dict())  # noqa: E731  what a checkpoint holds

    def loss_on(z0: torch.Tensor, captions: list[str], weight) -> torch.Tensor:
        """The diffusion loss of one half, its noise and timesteps drawn whole and shared (dist.py)."""
        t = dist.share(torch.randint(0, len(alpha_bar), (len(z0),), generator=g)).to(device)
        eps = dist.share(torch.randn(z0.shape, generator=g)).to(device)
        with torch.set_grad_enabled(bool(te_loras)):  # the text encoder is frozen unless it has LoRAs
            context = pipe.text_encoder(pipe.tokenizer(dist.share(captions), warn=False).to(device))
        return diffusion_loss(unet, dist.share(z0).to(device), t, eps, context, alpha_bar, cfg.min_snr_gamma,
                              weight=weight)

    steps = Steps(cfg.kind, step0, cfg.steps, log, checkpoint, cfg.checkpoint_minutes, losses, dist.is_main)
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup) * group["lr_scale"]
        idx = torch.randint(0, len(scenes), (n_concept,), generator=g)
        z0 = latent_batch(pipe, means, stds, idx, g).cpu()
        captions = draw_captions(scenes, idx, rng, cfg.caption_dropout)
        weight = None if weights is None else weights[dist.share(idx)].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            concept_loss, prior_loss = loss_on(z0, captions, weight), None
            if prior:
                jdx = torch.randint(0, len(prior_z), (n_prior,), generator=g)
                # dropped as often as the concept's: the unconditional prediction (CFG's other half) must keep
                # seeing ordinary pictures, not stars alone
                said = ["" if rng.random() < cfg.caption_dropout else prior_captions[j] for j in jdx.tolist()]
                prior_loss = loss_on(prior_z[jdx], said,
                                     None if prior_w is None else prior_w[dist.share(jdx)].to(device))
            loss = dreambooth_loss(concept_loss, prior_loss, cfg.prior_loss_weight)
        optimiser_step(loss, opt, params, dist=dist)
        steps.record(step, dist.all_mean(loss).item(), opt.param_groups[0]["lr"], state)
    steps.finish(state)

    if dist.is_main and lora:
        save_loras(cfg, out, {**loras, **te_loras})
    elif dist.is_main:
        unet.eval().requires_grad_(False)
        pipe.to("cpu", torch.float16)  # shipped in fp16, as the base model
        pipe.save_pretrained(out)
    return finish(cfg, out, work, log, t0, dist, steps.seconds_per_step)
