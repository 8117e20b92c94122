"""Training the shapes-world Stable Diffusion, from nothing, in one flat script (nanoGPT-style).

    minisd train all                       # the recipe of the shipped model, into runs/tiny/model
    minisd train unet                      # continue one stage from its checkpoint in --work
    minisd train lora|controlnet|inpaint   # what is trained on the finished model (finetune.py)
    minisd train textual-inversion|dreambooth   # two more ways to teach it `star` (train_ti.py, train_dreambooth.py)
    minisd train lcm                       # a latent consistency model distilled from it (train_lcm.py)
    minisd train mmdit                     # SD 3's transformer on its latents and text (train_mmdit.py)
    minisd train motion                    # a motion module on moving shapes, for videos (train_motion.py)
    minisd train unet --init-from data/tiny --prediction-type v_prediction|flow --out runs/tiny_v/model
                                           # the same model with another objective (diffusion.objectives)

The recipe, in the order SD itself was built:
  1. data   — scenes rendered by `minisd.shapes` (the base shapes only: `star` is held out)
  2. vae    — a KL-autoencoder, f = 4: 64×64×3 pixels <-> 16×16×4 latents; L1 + MSE, weighted up on
              object outlines, + a tiny KL; a quarter of its pictures are generic polygons (never a star);
              then the decoder alone (the latents final), last on over-contrasted latents, as CFG makes them
  3. scale  — the latent scaling factor 1/std(z₀) measured on the data (SD's 0.18215 was found this way)
  4. clip   — a tiny CLIP trained contrastively on (caption, picture) pairs; its text tower is then frozen
  5. unet   — ε-prediction on cached latents: z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε, loss ‖ε − ε_θ(z_t, t, c)‖²
              (Min-SNR-5 weighted), 10% of captions dropped to "" for classifier-free guidance, EMA weights
  6. save   — the diffusers folder layout under --out (fp16 safetensors), read by `StableDiffusion.from_pretrained`,
              with training.json (config, minutes per stage, machine, loss curve) beside it

Another objective (--prediction-type, `diffusion.objectives`): v-prediction on the same betas rescaled to
zero terminal SNR (Lin et al. 2024), or flow matching (x_σ = (1−σ) z₀ + σ ε, target ε − z₀, σ logit-normal
and shifted; SD 3). --init-from starts it from a finished model: its VAE, text encoder and tokenizer as they
are, its U-Net's weights as the first ones (as SD 2's v models were fine-tuned from ε ones).

Every stage logs to <work>/log.txt, writes sample pictures, checkpoints every few minutes and
resumes from its checkpoint. Timings are measured and written to <work>/timings.json. An existing
model in --out is replaced only with --force (the shipped one: --out data/tiny --force).

Under `torchrun --nproc_per_node N -m minisd train ...` (or `accelerate launch`) the VAE and U-Net stages
split every global batch among the N processes and give the model one process gives (dist.py); the
CLIP stage is trained whole by each process alike (its contrastive loss compares every caption of the
batch with every picture), and rank 0's weights are kept. docs/training.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import finetune, train_lcm, world
from .clip import CLIP
from .dist import SINGLE, Dist, end
from .loop import (Log, check_config, config_flags, config_from, diffusion_loss, edge_map, ema_update, load_checkpoint,
                   lr_at, optimiser_step, progress, refuse_overwrite, resume, save_checkpoint, seeded, use_bf16,
                   write_json)
from ..diffusion.objectives import OBJECTIVES, draw_timesteps
from ..diffusion.schedules import SchedulerConfig
from ..models.configs import TINY, ModelConfig
from ..models.text_encoder import TextEncoder
from ..models.tokenizer import Tokenizer, build_word_tokenizer
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..pipeline import StableDiffusion


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/tiny/model"      # the finished model (diffusers layout); the shipped one is data/tiny
    work: str = "runs/tiny"           # checkpoints, logs, sample grids
    device: str = "cpu"
    seed: int = 0
    n_images: int = 40_000            # scenes rendered once and reused by every stage
    # VAE
    vae_steps: int = 2000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6           # SD used 1e-6 too: latents stay informative, the KL only keeps them tame
    vae_clutter: float = 0.25         # share of each VAE batch drawn from world.clutter (random polygons)
    vae_spiky: float = 0.5            # share of clutter polygons drawn with thin points (3, 4, 6, 7 or 8; never 5)
    vae_edge_weight: float = 10.0     # extra weight of pixels on object outlines (0: plain L1 + MSE)
    vae_decoder_steps: int = 600      # then the decoder alone, the encoder (and so every latent) final, as SD's
    vae_decoder_lr: float = 2e-4      #   ft-EMA/ft-MSE decoders were made: sharper small shapes, same latents
    vae_contrast_steps: int = 150     # then the decoder on over-contrasted latents too, what strong guidance hands it:
    vae_contrast: float = 1.4         #   half of each batch with its spatial contrast raised k ~ U(1, this) times
    # CLIP
    clip_steps: int = 400
    clip_batch: int = 256
    clip_lr: float = 5e-4
    # U-Net
    unet_steps: int = 3300
    unet_batch: int = 64
    unet_lr: float = 5e-4
    warmup: int = 200
    caption_dropout: float = 0.1      # p(caption -> ""): the unconditional branch of CFG
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0        # Min-SNR weighting (Hang et al. 2023): faster, steadier convergence
    unet_refine_steps: int = 1100     # then: restart from the EMA weights at a constant, lower rate
    unet_refine_lr: float = 2e-4      #   (binding colours to objects in two-object scenes is learnt late)
    unet_two_share: float = 0.7       # share of captioned U-Net samples showing two objects (0: uniform, about half)
    bf16: str = "auto"                # U-Net steps under bfloat16 autocast: "yes", "no", or "auto" (CUDA, or a CPU with avx512_bf16/AMX)
    checkpoint_minutes: float = 5.0
    sample_steps: int = 25            # sampling steps of the sample grids written during training
    # the objective (diffusion.objectives), and where to start from
    prediction_type: str = "epsilon"  # "epsilon", "v_prediction" (with a zero-terminal-SNR schedule) or "flow"
    flow_shift: float = 1.0           # flow: σ -> sσ/(1 + (s−1)σ) in training and sampling (SD 3: 3.0 at 128² latents)
    init_from: str = ""               # a finished model folder: its VAE, text encoder and tokenizer are used as they
                                      #   are (no vae/clip stage) and its U-Net's weights start the U-Net stage

    def __post_init__(self):  # careless input is refused before any work
        check_config(self, at_least_1=("n_images", "vae_steps", "vae_batch", "clip_steps", "clip_batch", "unet_steps",
                                       "unet_batch", "sample_steps"),
                     at_least_0=("seed", "vae_decoder_steps", "vae_contrast_steps", "warmup", "unet_refine_steps"),
                     above_0=("vae_lr", "vae_decoder_lr", "clip_lr", "unet_lr", "unet_refine_lr", "min_snr_gamma",
                              "checkpoint_minutes"),
                     not_negative=("kl_weight", "vae_edge_weight"),
                     shares=("vae_clutter", "vae_spiky", "caption_dropout", "unet_two_share", "ema_decay"),
                     choices={"bf16": ("yes", "no", "auto"), "prediction_type": OBJECTIVES})
        if not 0 < self.flow_shift <= 100:
            raise ValueError(f"--flow-shift must be in (0, 100], got {self.flow_shift!r}")
        if self.init_from and not (Path(self.init_from) / "model_index.json").is_file():
            raise ValueError(f"--init-from {self.init_from!r}: not a model folder (no model_index.json there)")
        if self.vae_contrast < 1:
            raise ValueError(f"--vae-contrast must be at least 1 (1: no change), got {self.vae_contrast!r}")


# ─── pictures and the model's config ───────────────────────────────────────────────────────────────────────────────────────

def grid(images: torch.Tensor, nrow: int = 8):
    """(B, 3, H, W) in [-1, 1] -> one PIL picture."""
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    B, _, H, W = x.shape
    rows = math.ceil(B / nrow)
    canvas = torch.zeros(3, rows * H, nrow * W, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        canvas[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = x[i]
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())


def model_config(tokenizer: Tokenizer, cfg: TrainConfig | None = None) -> ModelConfig:
    """TINY, with the text encoder's vocabulary sized to the tokenizer and the schedule of the objective."""
    return replace(TINY, text_encoder=replace(TINY.text_encoder, vocab_size=len(tokenizer)),
                   scheduler=schedule_for(cfg.prediction_type if cfg else "epsilon", cfg.flow_shift if cfg else 1.0))


def schedule_for(prediction_type: str, flow_shift: float = 1.0) -> SchedulerConfig:
    """The training schedule of each objective: SD 1.x's for ε; for v, the same betas rescaled to zero
    terminal SNR with trailing timesteps (Lin et al. 2024: both are needed to start sampling from pure
    noise); for flow, the straight path and its shift."""
    if prediction_type == "v_prediction":
        return replace(TINY.scheduler, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                       timestep_spacing="trailing")
    if prediction_type == "flow":
        return SchedulerConfig(prediction_type="flow", shift=flow_shift)
    return TINY.scheduler


# ─── data ──────────────────────────────────────────────────────────────────────────────────────────

def make_data(cfg: TrainConfig, log: Log):
    """Render the training scenes once: images as uint8 (N, 3, 64, 64), and the scenes themselves,
    whose captions are re-drawn every time they are used (which attributes get named varies)."""
    t0 = time.time()
    scenes = [world.make_scene(cfg.seed * 10_000_000 + i) for i in range(cfg.n_images)]
    images = torch.stack([torch.from_numpy(np.array(world.render(s))).permute(2, 0, 1) for s in scenes])
    log(f"data: {len(scenes)} scenes rendered in {time.time() - t0:.0f}s")
    return images, scenes


def to_float(images_u8: torch.Tensor, device) -> torch.Tensor:
    return (images_u8.to(device).float() / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)


def captions_for(scenes, idx, rng: np.random.Generator, dropout: float = 0.0) -> list[str]:
    out = []
    for i in idx:
        if dropout and rng.random() < dropout:
            out.append("")
        else:
            out.append(world.make_caption(copy.copy(scenes[i]), rng))
    return out


def captions_with_negatives(scenes, idx, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Captions for CLIP, and a hard negative for each two-object scene: the same caption (same words
    named) with the two objects' colours, shapes or positions swapped — true of no picture."""
    captions, negatives = [], []
    for i in idx:
        scene = scenes[i]
        seed = int(rng.integers(2**31))
        captions.append(world.make_caption(copy.copy(scene), np.random.default_rng(seed)))
        if len(scene.objects) != 2:
            continue
        a, b = scene.objects
        swaps = [f for f in ("colour", "shape", "position") if getattr(a, f) != getattr(b, f)]  # never empty: positions differ
        field = swaps[int(rng.integers(len(swaps)))]
        a2, b2 = copy.copy(a), copy.copy(b)
        setattr(a2, field, getattr(b, field))
        setattr(b2, field, getattr(a, field))
        wrong = copy.copy(scene)
        wrong.objects = [a2, b2]
        negatives.append(world.make_caption(wrong, np.random.default_rng(seed)))
    return captions, negatives


# ─── stages ────────────────────────────────────────────────────────────────────────────────────────

def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor, edge_weight: float = 0.0,
                        dist: Dist = SINGLE) -> torch.Tensor:
    """L1 + MSE per pixel, averaged with weight 1 + edge_weight on outlines. A small star's points are
    a few dozen of the 4,096 pixels: with plain averaging the VAE can round them off for almost no
    loss; weighting the outlines makes shapes, not backgrounds, what the reconstruction is judged on.
    Under several processes the weights are normalised by their mean over the whole batch, so the
    processes' losses average to the whole batch's."""
    err = (x_hat - x).abs() + (x_hat - x).pow(2)
    if not edge_weight:
        return err.mean()
    w = 1 + edge_weight * edge_map(x)
    return (w * err).mean() / dist.all_mean(w.mean())


def over_contrast(z: torch.Tensor, k_max: float, g: torch.Generator, share: float = 0.5,
                  dist: Dist = SINGLE) -> torch.Tensor:
    """A `share` of the latents with their spatial contrast raised: z' = m + k·(z − m), k ~ U(1, k_max), m the
    mean of each channel over the picture. Guidance (CFG 7.5) overshoots like this: a decoder that has only
    seen the encoder's latents draws small shapes round and splits their colours; the target stays the clean
    picture, so this decoder learns to draw an over-contrasted latent as the shape it stands for.
    Under several processes `z` is this one's share: k and the choice are drawn for the whole batch."""
    n = len(z) * dist.world
    k = dist.share(1 + (k_max - 1) * torch.rand(n, 1, 1, 1, generator=g)).to(z)
    chosen = (dist.share(torch.rand(n, 1, 1, 1, generator=g)) < share).to(z.device)
    m = z.mean((2, 3), keepdim=True)
    return torch.where(chosen, m + k * (z - m), z)


def vae_losses(vae: AutoencoderKL, x: torch.Tensor, batch: int, decoder_only: bool, contrast: float | None,
               edge_weight: float, g: torch.Generator, dist: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction loss, KL) of this process's share `x` of a batch of `batch` pictures. Every
    posterior draw is made for the whole batch, as one process makes it, and this process takes its rows:
    joint training draws from the global generator (as `vae(x)` does), the decoder phases from `g`.
    `contrast`: the over-contrast's k_max (over_contrast), None for none."""
    if decoder_only:
        with torch.no_grad():
            posterior = vae.encode(x)
            eps = torch.randn((batch, *posterior.mean.shape[1:]), generator=g)
            z = posterior.mean + posterior.std * dist.share(eps).to(x.device)
            if contrast is not None:
                z = over_contrast(z, contrast, g, dist=dist)
        x_hat, kl = vae.decode(z), torch.zeros((), device=x.device)
    else:
        posterior = vae.encode(x)
        mean = posterior.mean
        eps = torch.randn((batch, *mean.shape[1:]), device=mean.device, dtype=mean.dtype)
        x_hat = vae.decode(mean + posterior.std * dist.share(eps))  # vae(x), its draw the whole batch's
        kl = posterior.kl().mean()  # summed over the latent, averaged over the batch
    return reconstruction_loss(x_hat, x, edge_weight, dist), kl


def train_vae(cfg: TrainConfig, mcfg: ModelConfig, images, log: Log, dist: Dist = SINGLE) -> AutoencoderKL:
    """The VAE stage. Its first weights and posterior draws come from the global generators: train_model
    runs it under loop.seeded(cfg.seed)."""
    work = Path(cfg.work)
    device = torch.device(cfg.device)
    vae = AutoencoderKL(mcfg.vae).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start, _ = resume(work / "vae.pt", log, model=vae, opt=opt)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    n_clutter = round(cfg.vae_batch * cfg.vae_clutter)
    if n_clutter:  # generic shapes for the VAE alone (never a star, never seen by CLIP or the U-Net)
        extra = torch.stack([torch.from_numpy(np.array(world.clutter(900_000_000 + i, cfg.vae_spiky))).permute(2, 0, 1)
                             for i in range(max(len(images) // 4, 1))])
        log(f"vae: {n_clutter} of every {cfg.vae_batch} pictures from {len(extra)} clutter pictures")
    last_save = time.time()
    contrast_from = cfg.vae_steps + cfg.vae_decoder_steps
    total = contrast_from + cfg.vae_contrast_steps
    bar = progress(start, total, "vae", dist.is_main)
    for step in bar:
        decoder_only = step >= cfg.vae_steps  # phases 2 and 3: the encoder is frozen (Adam skips gradient-less weights)
        contrast = step >= contrast_from
        vae.encoder.requires_grad_(not decoder_only), vae.quant_conv.requires_grad_(not decoder_only)
        if step == cfg.vae_steps:
            log(f"vae step {step}: the decoder alone from here, at lr {cfg.vae_decoder_lr:.1e}; the latents are final")
        if step == contrast_from and cfg.vae_contrast_steps:
            log(f"vae step {step}: half the decoder's latents over-contrasted from here (up to {cfg.vae_contrast:g}x)")
        phase_start = contrast_from if contrast else cfg.vae_steps
        for group in opt.param_groups:
            group["lr"] = (cfg.vae_decoder_lr * min(1.0, (step - phase_start + 1) / 50) if decoder_only
                           else lr_at(step, cfg.vae_steps, cfg.vae_lr, 100))
        idx = torch.randint(0, len(images), (cfg.vae_batch - n_clutter,), generator=g)
        batch = images[idx]
        if n_clutter:
            batch = torch.cat([batch, extra[torch.randint(0, len(extra), (n_clutter,), generator=g)]])
        x = to_float(dist.share(batch), device)
        rec, kl = vae_losses(vae, x, cfg.vae_batch, decoder_only, cfg.vae_contrast if contrast else None,
                             cfg.vae_edge_weight, g, dist)
        optimiser_step(rec + cfg.kl_weight * kl, opt, vae.parameters(), dist=dist)
        logged = step % 500 == 0 or step in (cfg.vae_steps - 1, contrast_from - 1, total - 1)
        if step % 50 == 0 or logged:
            rec, kl = dist.all_mean(rec).item(), dist.all_mean(kl).item()  # the whole batch's
        if step % 50 == 0:
            bar.set_postfix(rec=f"{rec:.4f}", kl=f"{kl:.0f}")
        if logged:
            log(f"vae step {step}: rec {rec:.4f} (L1+MSE), kl {kl:.0f} nats per image")
        if dist.is_main and time.time() - last_save > cfg.checkpoint_minutes * 60:
            save_checkpoint(work / "vae.pt", model=vae.state_dict(), opt=opt.state_dict(), step=step + 1)
            last_save = time.time()
    if dist.is_main:
        save_checkpoint(work / "vae.pt", model=vae.state_dict(), opt=opt.state_dict(), step=max(start, total))
    vae.requires_grad_(True).eval()
    with torch.no_grad():
        x = to_float(images[:16], device)
        if dist.is_main:
            grid(torch.cat([x, vae.decode(vae.encode(x).mode())])).save(work / "vae_reconstructions.png")
    return vae.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, images, device, n: int = 2000) -> float:
    """1 / std of the latents over the data, so diffusion sees z with unit variance (LDM, §4.3.2)."""
    zs = [vae.encode(to_float(images[i:i + 250], device)).sample() for i in range(0, min(n, len(images)), 250)]
    return float(1.0 / torch.cat(zs).std())


def train_clip(cfg: TrainConfig, mcfg: ModelConfig, tok: Tokenizer, images, scenes, log: Log,
               dist: Dist = SINGLE) -> TextEncoder:
    """The CLIP stage. Not split among processes: its loss compares every caption of a batch with every
    picture of it, so each process trains the whole of it alike, and rank 0's weights are kept."""
    work = Path(cfg.work)
    device = torch.device(cfg.device)
    with seeded(cfg.seed + 2, device):
        clip = CLIP(mcfg.text_encoder).to(device)
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_lr, weight_decay=0.1)
    start, _ = resume(work / "clip.pt", log, model=clip, opt=opt)
    if dist.world > 1:
        log(f"clip: not split among the {dist.world} processes (its contrastive loss needs every caption and "
            f"picture of the batch): each trains it on the whole batch alike; rank 0's weights are kept")
    dist.barrier()  # every process has read the checkpoint before rank 0 writes one
    rng = np.random.default_rng(cfg.seed + 3)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    last_save = time.time()
    bar = progress(start, cfg.clip_steps, "clip", dist.is_main)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.clip_steps, cfg.clip_lr, 100)
        idx = torch.randint(0, len(images), (cfg.clip_batch,), generator=g)
        captions, negatives = captions_with_negatives(scenes, idx.tolist(), rng)
        ids = tok(captions + negatives, warn=False)
        ids = ids[:, : int((ids != tok.pad_id).sum(1).max()) + 1].to(device)  # causal: padding after EOS can go
        loss = clip(ids[:len(captions)], to_float(images[idx], device), ids[len(captions):])
        optimiser_step(loss, opt, clip.parameters(), clip=None)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if dist.is_main and (step % 300 == 0 or step == cfg.clip_steps - 1):
            log(f"clip step {step}: contrastive loss {loss.item():.3f} (chance: {math.log(cfg.clip_batch):.2f}), "
                f"binding {binding_accuracy(clip, tok, images, scenes, device):.0%} (chance: 50%)")
        if dist.is_main and time.time() - last_save > cfg.checkpoint_minutes * 60:
            save_checkpoint(work / "clip.pt", model=clip.state_dict(), opt=opt.state_dict(), step=step + 1)
            last_save = time.time()
    dist.same(clip)  # the processes' runs can differ in the last bits (on GPUs): rank 0's
    if dist.is_main:
        save_checkpoint(work / "clip.pt", model=clip.state_dict(), opt=opt.state_dict(), step=cfg.clip_steps)
    return clip.text_encoder.eval()


@torch.no_grad()
def binding_accuracy(clip: CLIP, tok: Tokenizer, images, scenes, device, n: int = 256) -> float:
    """How often a two-object picture is closer to its caption than to the swapped caption (the last
    two-object scenes of the data, a fixed draw): 50% is a bag of words, 100% is a text tower that binds words to objects."""
    idx = [i for i in range(len(scenes) - 1, -1, -1) if len(scenes[i].objects) == 2][:n]
    captions, negatives = captions_with_negatives(scenes, idx, np.random.default_rng(0))
    was_training = clip.training
    clip.eval()
    img = clip.encode_image(to_float(images[idx], device))
    pos = (clip.encode_text(tok(captions, warn=False).to(device)) * img).sum(-1)
    neg = (clip.encode_text(tok(negatives, warn=False).to(device)) * img).sum(-1)
    clip.train(was_training)
    return float((pos > neg).float().mean())


@torch.no_grad()
def cache_latents(vae: AutoencoderKL, images, device, log: Log) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image once: the posterior's mean and std, so each U-Net step samples a fresh z₀."""
    t0 = time.time()
    means, stds = [], []
    for i in range(0, len(images), 500):
        post = vae.encode(to_float(images[i:i + 500], device))
        means.append(post.mean.half().cpu()), stds.append(post.std.half().cpu())
    log(f"latents cached for {len(images)} images in {time.time() - t0:.0f}s")
    return torch.cat(means), torch.cat(stds)


def batch_indices(two: torch.Tensor, batch: int, two_share: float, g: torch.Generator) -> torch.Tensor:
    """A batch of scene indices: uniform over the data, or (`two_share` > 0) that share of two-object scenes."""
    if two_share <= 0:
        return torch.randint(0, len(two), (batch,), generator=g)
    n_two = round(batch * two_share)
    pools = (two.nonzero().squeeze(1), (~two).nonzero().squeeze(1))
    return torch.cat([pool[torch.randint(0, len(pool), (n,), generator=g)] for pool, n in zip(pools, (n_two, batch - n_two))])


def unet_batch(cfg: TrainConfig, scenes, two: torch.Tensor, latents: tuple[torch.Tensor, torch.Tensor],
               n_timesteps: int, rng: np.random.Generator, g: torch.Generator, dist: Dist):
    """One global batch of the U-Net stage, drawn exactly as one process draws it — scene indices, captions
    (some dropped), posterior draws z₀ (unscaled), timesteps t, noise ε — and this process's share of each:
    (captions, z0, t, eps), on the CPU."""
    means, stds = latents
    idx = batch_indices(two, cfg.unet_batch, cfg.unet_two_share, g)
    captions = captions_for(scenes, idx.tolist(), rng, cfg.caption_dropout)
    if cfg.unet_two_share > 0:  # the unconditional branch of CFG learns the data as it is, not the reweighted mix
        empty = torch.tensor([c == "" for c in captions])
        idx[empty] = torch.randint(0, len(means), (int(empty.sum()),), generator=g)
    z0 = means[idx].float() + stds[idx].float() * torch.randn(means[idx].shape, generator=g)
    t = draw_timesteps(cfg.prediction_type, cfg.unet_batch, n_timesteps, g, cfg.flow_shift)
    eps = torch.randn(z0.shape, generator=g)
    return dist.share(captions), dist.share(z0), dist.share(t), dist.share(eps)


def train_unet(cfg: TrainConfig, mcfg: ModelConfig, tok: Tokenizer, text_encoder: TextEncoder,
               latents: tuple[torch.Tensor, torch.Tensor], scenes, scaling_factor: float,
               sample_fn, log: Log, init: UNet | None = None, dist: Dist = SINGLE) -> UNet:
    work = Path(cfg.work)
    device = torch.device(cfg.device)
    with seeded(cfg.seed + 4, device):
        unet = UNet(mcfg.unet).to(device)
    if init is not None:  # --init-from: a finished model's U-Net, whatever it predicted, starts this one
        unet.load_state_dict(init.state_dict())
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    start, losses = resume(work / "unet.pt", log, model=unet, ema=ema, opt=opt)  # losses: every step's so far
    alpha_bar = mcfg.scheduler.alphas_cumprod().to(device)
    rng = np.random.default_rng(cfg.seed + 5 + start)
    g = torch.Generator().manual_seed(cfg.seed + 5 + start)
    last_save = time.time()
    two = torch.tensor([len(s.objects) == 2 for s in scenes])
    bf16 = use_bf16(cfg.bf16, device)
    log(f"unet: {'bfloat16 autocast' if bf16 else 'float32'}")
    total = cfg.unet_steps + cfg.unet_refine_steps
    bar = progress(start, total, "unet", dist.is_main)
    for step in bar:
        if step == cfg.unet_steps and cfg.unet_refine_steps:  # phase 2 starts from the averaged weights
            unet.load_state_dict(ema.state_dict())
            opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_refine_lr, weight_decay=0.01)
            log(f"unet step {step}: refining from the EMA weights at lr {cfg.unet_refine_lr:.1e}")
        for group in opt.param_groups:
            group["lr"] = (lr_at(step, cfg.unet_steps, cfg.unet_lr, cfg.warmup) if step < cfg.unet_steps
                           else cfg.unet_refine_lr * min(1.0, (step - cfg.unet_steps + 1) / 50))
        captions, z0, t, eps = unet_batch(cfg, scenes, two, latents, len(alpha_bar), rng, g, dist)
        z0, t, eps = z0.to(device) * scaling_factor, t.to(device), eps.to(device)
        with torch.no_grad():
            context = text_encoder(tok(captions, warn=False).to(device))  # (B, 77, E): frozen, as SD freezes CLIP
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # weights, loss, Adam stay fp32
            loss = diffusion_loss(unet, z0, t, eps, context, alpha_bar, cfg.min_snr_gamma,
                                  prediction_type=cfg.prediction_type)
        optimiser_step(loss, opt, unet.parameters(), dist=dist)
        ema_update(ema, unet, step, cfg.ema_decay)
        losses.append(dist.all_mean(loss).item())  # the whole batch's
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % 250 == 0 or step == total - 1:
            log(f"unet step {step}: loss {np.mean(losses[-250:]):.4f}, lr {opt.param_groups[0]['lr']:.2e}")
        if dist.is_main and step > 0 and step % 1000 == 0:
            sample_fn(ema, f"unet_samples_{step:05d}.png")
        if dist.is_main and time.time() - last_save > cfg.checkpoint_minutes * 60:
            save_checkpoint(work / "unet.pt", losses, model=unet.state_dict(), ema=ema.state_dict(),
                            opt=opt.state_dict(), step=step + 1)
            last_save = time.time()
    if dist.is_main:
        save_checkpoint(work / "unet.pt", losses, model=unet.state_dict(), ema=ema.state_dict(),
                        opt=opt.state_dict(), step=total)
        write_json(work / "unet_losses.json", losses[::10])  # every 10th loss, from step 0 however often it resumed
    return ema.eval()


SAMPLE_PROMPTS = ["a red circle", "a large blue square on the left", "a small yellow triangle at the top",
                  "a green circle on a black background", "a large purple triangle in the center",
                  "an orange square at the bottom on a gray background",
                  "a red circle on the left and a blue square on the right",
                  "a yellow triangle on the left and a green circle on the right"]


STAGES = ("all", "vae", "clip", "unet")


def main(argv: list[str] | None = None) -> Path:
    """`minisd train <stage|lora|controlnet|inpaint|textual-inversion|dreambooth|lcm>`: the one place every kind of training is started
    from, on one process or under torchrun (dist.py). Returns where the result was saved."""
    try:
        return start_training(sys.argv[1:] if argv is None else argv)
    finally:
        end()  # leave the process group, if torchrun started this process among others


def start_training(argv: list[str]) -> Path:
    """The kind of training `argv` names, with its flags."""
    if argv and argv[0] in finetune.KINDS:  # trained on the finished model: finetune.py
        return finetune.main(argv)
    if argv and argv[0] == "lcm":  # distilled from the finished model: train_lcm.py
        return train_lcm.main(argv[1:])
    parser = argparse.ArgumentParser(prog="minisd train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", nargs="?", default="all", choices=STAGES,
                        help="what to train (default: the whole recipe); `minisd train lora|controlnet|inpaint|"
                             "textual-inversion|dreambooth --help` trains adapters (and the inpainting model) on the finished model, "
                             "`minisd train lcm --help` distils it, `minisd train mmdit --help` trains a transformer "
                             "in the U-Net's place, `minisd train motion --help` a motion module for videos")
    config_flags(parser, TrainConfig)
    parser.add_argument("--fresh", action="store_true", help="ignore checkpoints in --work and start over")
    parser.add_argument("--force", action="store_true", help="overwrite a model already in --out")
    args = parser.parse_args(argv)
    cfg = config_from(args, TrainConfig)  # refuses careless values
    return train_model(cfg, args.stage, force=args.force, fresh=args.fresh)


def train_model(cfg: TrainConfig, stage: str = "all", force: bool = False, fresh: bool = False) -> Path:
    """The recipe (this module's docstring), retraining `stage` and whatever has no checkpoint yet; the
    model is saved to cfg.out, which must be empty or missing unless `force`. Returns cfg.out."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    refuse_overwrite(Path(cfg.out), force)
    work = Path(cfg.work)
    dist = Dist.from_env(cfg.device, split_batches(cfg, stage, fresh))
    if fresh and work.exists() and dist.is_main:
        for p in [*work.glob("*.pt"), work / "timings.json"]:
            p.unlink(missing_ok=True)
    dist.barrier()  # no process reads a checkpoint that --fresh removes
    log = Log(work, dist.is_main)
    log(f"config: {json.dumps(asdict(cfg))}")
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def timed(name, fn, *a):  # a trained stage resumed from its checkpoint adds to the time already spent
        t0 = time.time()
        resumed = name in ("vae", "clip", "unet") and (work / f"{name}.pt").is_file()
        out = fn(*a)
        timings[name] = (timings.get(name, 0.0) if resumed else 0.0) + time.time() - t0
        if dist.is_main:
            write_json(timings_path, timings)
        log(f"{name}: {timings[name] / 60:.1f} min")
        return out

    images, scenes = timed("data", make_data, cfg, log)
    if cfg.init_from:
        tok, mcfg, vae, text_encoder, init = reused_from(cfg, log)
    else:
        tok, mcfg, vae, text_encoder = trained_vae_and_clip(cfg, stage, images, scenes, timed, log, dist)
        init = None
    scaling_factor = mcfg.vae.scaling_factor

    def assemble(unet: UNet) -> StableDiffusion:
        pipe = StableDiffusion(unet, vae, text_encoder, tok, mcfg.scheduler, name="tiny")
        pipe.vae.config = mcfg.vae
        pipe.progress = False
        return pipe

    def sample_fn(unet: UNet, name: str) -> None:
        pipe = assemble(unet.eval())
        imgs = pipe(SAMPLE_PROMPTS, num_inference_steps=cfg.sample_steps, seed=0, output_type="pt",
                    num_images_per_prompt=2)
        grid(imgs * 2 - 1).save(work / name)
        unet.train()

    latents = timed("cache", cache_latents, vae, images, torch.device(cfg.device), log)
    unet = timed("unet", train_unet, cfg, mcfg, tok, text_encoder, latents, scenes, scaling_factor, sample_fn, log,
                 init, dist)
    if dist.is_main:
        pipe = assemble(unet)
        sample_fn(unet, "unet_samples_final.png")
        pipe.to("cpu", torch.float16)  # shipped in fp16: half the size, and CPU loads it back as fp32
        pipe.save_pretrained(cfg.out)
        write_training_record(cfg, timings, work, Path(cfg.out), stage, dist.world)
        log(f"saved the model to {cfg.out}; total {sum(timings.values()) / 60:.1f} min: {json.dumps(timings)}")
    dist.barrier()  # the model is in --out when any process returns
    return Path(cfg.out)


def split_batches(cfg: TrainConfig, stage: str, fresh: bool = False) -> dict[str, int]:
    """The batches that `stage` splits among processes ({flag: size}): the U-Net's, and the VAE's if it is trained."""
    trains_vae = not cfg.init_from and (fresh or stage in ("all", "vae") or not (Path(cfg.work) / "vae.pt").is_file())
    return {"--unet-batch": cfg.unet_batch, **({"--vae-batch": cfg.vae_batch} if trains_vae else {})}


def trained_vae_and_clip(cfg: TrainConfig, stage: str, images, scenes, timed, log: Log, dist: Dist = SINGLE):
    """Stages 2-4: the VAE, its latent scaling factor and the text encoder, each trained unless `stage`
    is a later one and its checkpoint is in --work. Returns (tokenizer, model config, vae, text encoder)."""
    work, device = Path(cfg.work), torch.device(cfg.device)
    tok = build_word_tokenizer(world.VOCABULARY, work / "tokenizer") if dist.is_main else None
    dist.barrier()  # rank 0 has written the tokenizer's files
    if tok is None:
        tok = Tokenizer(work / "tokenizer")
    mcfg = model_config(tok, cfg)
    with seeded(cfg.seed, device):  # the VAE's first weights and posterior draws, then the scaling factor's
        if stage in ("all", "vae") or not (work / "vae.pt").is_file():
            vae = timed("vae", train_vae, cfg, mcfg, images, log, dist)
        else:
            vae = AutoencoderKL(mcfg.vae).to(device)
            vae.load_state_dict(load_checkpoint(work / "vae.pt")["model"])
        vae.eval()
        scaling_factor = dist.same_value(measure_scaling_factor(vae, images, device))  # rank 0's, to the last bit
    log(f"latent scaling factor: {scaling_factor:.4f} (SD 1.x: 0.18215)")
    mcfg = replace(mcfg, vae=replace(mcfg.vae, scaling_factor=round(scaling_factor, 5)))

    if stage in ("all", "clip") or not (work / "clip.pt").is_file():
        text_encoder = timed("clip", train_clip, cfg, mcfg, tok, images, scenes, log, dist)
    else:
        clip = CLIP(mcfg.text_encoder).to(device)
        clip.load_state_dict(load_checkpoint(work / "clip.pt")["model"])
        text_encoder = clip.text_encoder.eval()
    text_encoder.requires_grad_(False)
    return tok, mcfg, vae, text_encoder


def reused_from(cfg: TrainConfig, log: Log):
    """--init-from: a finished model's tokenizer, VAE (and scaling factor) and text encoder as they are,
    and its U-Net to start from; the schedule is the new objective's. Returns (tokenizer, model config,
    vae, text encoder, the U-Net to start from)."""
    base = StableDiffusion.from_pretrained(cfg.init_from, device=cfg.device, dtype=torch.float32)
    mcfg = ModelConfig(unet=base.unet.config, vae=base.vae.config, text_encoder=base.text_encoder.config,
                       scheduler=schedule_for(cfg.prediction_type, cfg.flow_shift))
    if base.unet.config.in_channels != 4:
        raise ValueError(f"--init-from {cfg.init_from!r}: its U-Net takes {base.unet.config.in_channels} channels; "
                         f"a text-to-image U-Net (4) is needed")
    log(f"from {cfg.init_from}: its tokenizer, VAE (scaling factor {mcfg.vae.scaling_factor}) and text encoder; "
        f"its U-Net ({base.scheduler.prediction_type}) starts the {cfg.prediction_type} U-Net")
    base.vae.eval(), base.text_encoder.eval().requires_grad_(False)
    return base.tokenizer, mcfg, base.vae, base.text_encoder, base.unet


def write_training_record(cfg: TrainConfig, timings: dict, work: Path, out: Path, stage: str = "all",
                          processes: int = 1) -> None:
    """training.json beside the weights: the config, the minutes per stage, the machine (and how many
    processes trained), the loss curve."""
    losses = json.loads((work / "unet_losses.json").read_text()) if (work / "unet_losses.json").is_file() else []
    record = {"command": f"minisd train {stage}", "config": asdict(cfg),
              "minutes": {k: round(v / 60, 2) for k, v in timings.items()},
              "total_minutes": round(sum(timings.values()) / 60, 1),
              "machine": {"device": cfg.device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "platform": platform.platform(), "processes": processes},
              "unet_loss_every_10_steps": [round(x, 5) for x in losses]}
    write_json(out / "training.json", record)


if __name__ == "__main__":
    main()
