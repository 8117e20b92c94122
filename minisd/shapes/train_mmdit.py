"""A tiny MMDiT for the shapes world: SD 3's transformer trained with rectified flow, beside the tiny U-Net.

    frozen     the shipped model's VAE (its latents, its scaling factor), tokenizer and text encoder
    trained    a fresh MMDiT (models/mmdit.py): 2×2 patches of the 16×16×4 latents, joint attention over the
               64 image tokens and the 77 text tokens, adaLN-Zero from t and the pooled text (the EOS state)
    objective  flow matching (diffusion/objectives.py): x_σ = (1−σ) z₀ + σ ε, target ε − z₀, σ logit-normal
    data       the U-Net's: the same scenes, captions, caption dropout and share of two-object scenes
    saved      fp16, as an SD 3 folder (pipeline_sd3.StableDiffusion3): transformer/ in diffusers'
               SD3Transformer2DModel layout, the VAE and text encoder as they were, a FlowMatchEuler scheduler

Everything but the backbone is the U-Net recipe's, so the two can be compared on one table
(shapes/scoreboard.py): the question is what joint attention changes, above all for two objects.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..diffusion import objectives
from ..models.mmdit import MMDiT, MMDiTConfig
from ..pipeline import StableDiffusion
from ..pipeline_sd3 import StableDiffusion3
from .loop import (Log, Steps, check_config, config_flags, config_from, lr_at, optimiser_step, refuse_overwrite,
                   resume, seeded, use_bf16, ema_update, write_json)
from .dist import SINGLE
from .train import TrainConfig, cache_latents, make_data, unet_batch


@dataclass
class MMDiTTrainConfig:
    out: str = "runs/tiny_mmdit/model"  # the finished model (an SD 3 folder); the shipped one is data/tiny_mmdit
    work: str = "runs/tiny_mmdit"       # checkpoints, logs
    base: str = "tiny"                  # the model whose VAE, tokenizer and text encoder are used, frozen
    device: str = "cpu"
    seed: int = 0
    n_images: int = 40_000              # the U-Net's scenes (same seeds)
    # the transformer: width = heads × head_dim
    layers: int = 6
    heads: int = 4
    head_dim: int = 32
    qk_norm: str = "rms_norm"           # RMSNorm on queries and keys (SD 3.5), or "none" (SD 3)
    # the loop
    steps: int = 2000
    batch: int = 64
    lr: float = 5e-4
    warmup: int = 200
    caption_dropout: float = 0.1        # p(caption -> ""): the unconditional branch of CFG
    two_share: float = 0.7              # share of captioned samples showing two objects, as the U-Net's
    ema_decay: float = 0.999
    flow_shift: float = 1.0             # σ -> sσ/(1 + (s−1)σ) in training and sampling
    bf16: str = "auto"                  # bfloat16 autocast: "yes", "no", or "auto" (CUDA, or a CPU with avx512_bf16/AMX)
    checkpoint_minutes: float = 5.0

    def __post_init__(self):
        check_config(self, at_least_1=("n_images", "layers", "heads", "head_dim", "steps", "batch"),
                     at_least_0=("seed", "warmup"), above_0=("lr", "checkpoint_minutes"),
                     shares=("caption_dropout", "two_share", "ema_decay"),
                     choices={"bf16": ("yes", "no", "auto"), "qk_norm": ("rms_norm", "none")})
        if not 0 < self.flow_shift <= 100:
            raise ValueError(f"--flow-shift must be in (0, 100], got {self.flow_shift!r}")

    def batches(self) -> TrainConfig:
        """The U-Net recipe's batch drawing (train.unet_batch) with this loop's sizes and the flow objective."""
        return TrainConfig(seed=self.seed, n_images=self.n_images, unet_batch=self.batch, unet_two_share=self.two_share,
                           caption_dropout=self.caption_dropout, prediction_type="flow", flow_shift=self.flow_shift)


def mmdit_config(cfg: MMDiTTrainConfig, latent_channels: int, latent_size: int, text_width: int) -> MMDiTConfig:
    """The transformer for latents (C, S, S) and a text encoder of width E: its hidden states are the joint
    attention's text tokens, its EOS state the pooled vector."""
    return MMDiTConfig(sample_size=latent_size, patch_size=2, in_channels=latent_channels, out_channels=latent_channels,
                       num_layers=cfg.layers, num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
                       joint_attention_dim=text_width, caption_projection_dim=cfg.heads * cfg.head_dim,
                       pooled_projection_dim=text_width, pos_embed_max_size=latent_size // 2,
                       qk_norm=None if cfg.qk_norm == "none" else cfg.qk_norm)


def flow_loss(model: MMDiT, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, context: torch.Tensor,
              pooled: torch.Tensor, n_train: int = 1000) -> torch.Tensor:
    """‖(ε − z₀) − v_θ(x_σ, σ, text)‖², x_σ = (1−σ) z₀ + σ ε, t = N·σ (objectives.noised_and_target)."""
    x_t, target = objectives.noised_and_target("flow", z0, eps, t, torch.empty(0), n_train)
    return (model(x_t, context, pooled, t) - target).pow(2).mean()


def train_mmdit(cfg: MMDiTTrainConfig, force: bool = False) -> Path:
    """The loop; the finished model is saved to cfg.out (which must be empty unless `force`). Returns cfg.out."""
    refuse_overwrite(Path(cfg.out), force)
    work, device = Path(cfg.work), torch.device(cfg.device)
    log = Log(work)
    log(f"config: {json.dumps(asdict(cfg))}")
    t0 = time.time()
    base = StableDiffusion.from_pretrained(cfg.base, device=device, dtype=torch.float32)
    base.vae.eval(), base.text_encoder.eval().requires_grad_(False)
    images, scenes = make_data(cfg.batches(), log)
    latents = cache_latents(base.vae, images, device, log)
    mcfg = mmdit_config(cfg, base.vae.config.latent_channels, latents[0].shape[-1], base.text_encoder.config.hidden_size)
    with seeded(cfg.seed + 4, device):
        model = MMDiT(mcfg).init_adaln_zero_().to(device)  # adaLN-Zero: every block starts as the identity
    log(f"MMDiT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
        f"(the U-Net: {sum(p.numel() for p in base.unet.parameters()) / 1e6:.2f}M)")
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    start, losses = resume(work / "mmdit.pt", log, model=model, ema=ema, opt=opt)
    rng, g = np.random.default_rng(cfg.seed + 5 + start), torch.Generator().manual_seed(cfg.seed + 5 + start)
    two = torch.tensor([len(s.objects) == 2 for s in scenes])
    bf16, batches, tok, te = use_bf16(cfg.bf16, device), cfg.batches(), base.tokenizer, base.text_encoder
    steps = Steps("mmdit", start, cfg.steps, log, work / "mmdit.pt", cfg.checkpoint_minutes, losses)

    def state() -> dict:
        return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()}

    for step in steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        captions, z0, t, eps = unet_batch(batches, scenes, two, latents, 1000, rng, g, SINGLE)
        z0, t, eps = z0.to(device) * base.vae.config.scaling_factor, t.to(device), eps.to(device)
        with torch.no_grad():
            ids = tok(captions, warn=False).to(device)
            context = te(ids)                                  # (B, 77, E), final LayerNorm
            pooled = te.pooled(ids, context)                   # (B, E): the EOS state
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = flow_loss(model, z0, t, eps, context, pooled)
        optimiser_step(loss, opt, model.parameters())
        ema_update(ema, model, step, cfg.ema_decay)
        steps.record(step, loss.item(), opt.param_groups[0]["lr"], state)
    steps.finish(state)
    minutes = spent_minutes(work, t0)
    save_model(cfg, base, ema.eval(), losses, minutes, steps.seconds_per_step)
    log(f"saved the model to {cfg.out}; {minutes:.1f} min of training in all")
    return Path(cfg.out)


def spent_minutes(work: Path, t0: float) -> float:
    """Minutes spent on this model over every run (a resumed run adds to the ones before), kept in --work."""
    path = work / "minutes.json"
    before = json.loads(path.read_text())["minutes"] if path.is_file() else 0.0
    minutes = before + (time.time() - t0) / 60
    write_json(path, {"minutes": minutes})
    return minutes


def save_model(cfg: MMDiTTrainConfig, base: StableDiffusion, model: MMDiT, losses: list[float], minutes: float,
               seconds_per_step: float | None) -> None:
    """The SD 3 folder (fp16) and training.json beside it: config, minutes, machine, the loss every 10 steps."""
    pipe = StableDiffusion3.tiny(model, base.vae, base.text_encoder, base.tokenizer, flow_shift=cfg.flow_shift)
    pipe.to("cpu", torch.float16)
    pipe.save_pretrained(cfg.out)
    record = {"command": "minisd train mmdit", "config": asdict(cfg), "minutes": round(minutes, 1),
              "seconds_per_step": seconds_per_step, "parameters": sum(p.numel() for p in model.parameters()),
              "machine": {"device": cfg.device, "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
              "loss_every_10_steps": [round(x, 5) for x in losses[::10]]}
    write_json(Path(cfg.out) / "training.json", record)


def main(argv: list[str]) -> Path:
    """`minisd train mmdit [flags]`."""
    parser = argparse.ArgumentParser(prog="minisd train mmdit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    config_flags(parser, MMDiTTrainConfig)
    parser.add_argument("--force", action="store_true", help="overwrite a model already in --out")
    args = parser.parse_args(argv)
    return train_mmdit(config_from(args, MMDiTTrainConfig), force=args.force)
