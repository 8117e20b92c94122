"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", alg. 1) of the finished tiny
model: a student that draws in 2–4 steps, guidance built in, what the teacher draws in 25 with CFG.

    teacher    the finished ε model (--base), frozen, guided at scale s (its CFG batch [∅, c]); or a v-prediction
               model (its schedule too: data/tiny_v's ends at zero SNR), and the student then predicts v
    student    a copy of its U-Net with a guidance input (`time_cond_proj_dim`, s embedded as w = s − 1);
               `cond_proj` starts at zero, so the student starts as the teacher exactly
    target     the EMA of the student (decay 0.95, the LCM script's), never trained by gradient
    data       scenes of the base model's world, rendered and encoded once; every caption kept (the
               unconditional branch is the teacher's own "")
    saved      a whole diffusers pipeline folder, fp16: the base's VAE, text encoder and tokenizer, the student
               U-Net, an LCMScheduler config; `pipe(prompt, num_inference_steps=4)` samples it with "lcm"

One step, as diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py takes it:

    n ~ U{0..49},  t_{n+k} = k(n+1) − 1,  t_n = max(t_{n+k} − k, 0)    k = 20: the 50 timesteps LCM samples on
    s ~ U[guidance_min, guidance_max]                                  the scale as pipe(guidance_scale=) takes it
    z = √ᾱ z₀ + √(1−ᾱ) ε                                               eq. 2 at t_{n+k}
    ε̃ = ε_T(z, ∅) + s·(ε_T(z, c) − ε_T(z, ∅)),  ẑ₀ = (z − √(1−ᾱ) ε̃)/√ᾱ    the teacher, with CFG
    ẑ_n = √ᾱ_n ẑ₀ + √(1−ᾱ_n) ε̃                                          one DDIM step of its ODE, to t_n
    f_θ(z, t, s) = c_skip(t) z + c_out(t) x̂₀_θ(z, t, s)                  the boundary condition: f = z at t = 0
    L = mean √((f_θ(z, t_{n+k}, s) − f_θ⁻(ẑ_n, t_n, s))² + c²) − c       pseudo-Huber, c = 0.001; θ⁻ the EMA

Under torchrun each batch is drawn whole and each of the N processes takes its share (dist.py): the same
student as one process trains.

The script's w is the embedded w = s − 1 (its ε_c + w(ε_c − ε_∅) is the same extrapolation), so its
w_min = 5, w_max = 15 for SD 1.5 are s in [6, 16]. Here s ~ U[3, 9]: the tiny model's default 7.5 sits
inside, and so does 3, where it followed prompts best (docs/results/guidance_scale.json: 82% of pictures
right at 3, 62% at 7.5); a student only learns the scales it is shown.

config → data → model → loop → save, in `train_lcm`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import world
from .adapter_config import draw_captions, latent_batch, render_and_encode
from .dist import Dist
from .loop import (Log, Steps, check_config, config_flags, config_from, lr_at, optimiser_step, refuse_overwrite,
                   resume, seeded, use_bf16, write_json)
from ..diffusion.denoisers import guidance_scale_embedding, to_eps, to_x0
from ..diffusion.samplers import LCM_ORIGINAL_STEPS, LCM_TIMESTEP_SCALING, lcm_scalings
from ..models.unet import UNet
from ..pipeline import StableDiffusion


@dataclass(frozen=True)
class LCMConfig:
    base: str = "tiny"                # the teacher: the shipped data/tiny, or any ε or v model folder (data/tiny_v)
    out: str = "runs/tiny_lcm/model"  # the distilled pipeline (never data/ by default)
    work: str = "runs/tiny_lcm"       # checkpoint, log
    device: str = "cpu"
    seed: int = 0
    n_images: int = 4000              # scenes rendered and encoded once (a fresh posterior draw each use)
    # 1200 × 32: one step costs what a batch-64 step of the base recipe does (the student's forward and backward
    # on B, the teacher's forward on 2B, the target's on B), ~1 s on 2 cores: ~21 minutes, each scene seen ~10 times
    steps: int = 1200
    batch: int = 32
    lr: float = 1e-4                  # the script's default; AdamW without weight decay (its example run), cosine to 10%
    warmup: int = 50
    ema_decay: float = 0.95           # the target network θ⁻ ← d θ⁻ + (1 − d) θ, every step (the script's default)
    guidance_min: float = 3.0         # s ~ U[min, max], the guidance scale as pipe() takes it (embedded w = s − 1)
    guidance_max: float = 9.0
    time_cond_proj_dim: int = 256     # W, the guidance embedding's width (the script's and LCM_Dreamshaper_v7's)
    huber_c: float = 0.001            # pseudo-Huber's c (the script's)
    bf16: str = "auto"                # bfloat16 autocast, as for the base model (loop.use_bf16)
    checkpoint_minutes: float = 5.0
    init: str = ""                    # an LCM pipeline folder whose student to go on training (e.g. data/tiny_lcm)

    def __post_init__(self):  # careless input is refused before any work
        check_config(self, at_least_1=("n_images", "steps", "batch"), at_least_0=("seed", "warmup"),
                     above_0=("lr", "huber_c", "checkpoint_minutes"), shares=("ema_decay",),
                     choices={"bf16": ("yes", "no", "auto")})
        if not 1.0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"--guidance-min must be at least 1 (no guidance) and at most --guidance-max "
                             f"({self.guidance_max!r}), got {self.guidance_min!r}")
        if self.init and not Path(self.init).is_dir():
            raise ValueError(f"--init {self.init!r} is not a folder (an LCM pipeline, e.g. data/tiny_lcm)")
        if self.time_cond_proj_dim < 4:  # the embedding's frequencies divide by W/2 − 1
            raise ValueError(f"--time-cond-proj-dim must be at least 4, got {self.time_cond_proj_dim!r}")


def lcm_scenes(cfg: LCMConfig) -> list[world.Scene]:
    """Fresh scenes of the base model's world (its shapes, one or two objects), far from other loops' seeds."""
    return [world.make_scene(70_000_000 + cfg.seed * 1_000_000 + i) for i in range(cfg.n_images)]


def student_unet(teacher: UNet, dim: int) -> UNet:
    """The teacher's U-Net with a guidance input of width `dim`: every weight the teacher's, `cond_proj` zero, so
    it predicts exactly the teacher's unguided ε whatever scale it is given."""
    student = UNet(replace(teacher.config, time_cond_proj_dim=dim)).to(teacher.device)
    state = teacher.state_dict()
    proj = student.time_embedding.cond_proj.weight
    state["time_embedding.cond_proj.weight"] = torch.zeros_like(proj)
    student.load_state_dict(state)  # strict: every other weight is the teacher's
    return student


def earlier_student(folder: str, student: UNet) -> dict:
    """The U-Net weights of an LCM pipeline folder, fp32, for a student of `student`'s configuration (a
    ValueError naming the folder if its U-Net is another)."""
    earlier = StableDiffusion.from_pretrained(folder, device=torch.device("cpu"), dtype=torch.float32).unet
    if earlier.config != student.config:
        raise ValueError(f"--init {folder!r}: its U-Net is not this student's configuration (the teacher's U-Net "
                         f"with time_cond_proj_dim={student.config.time_cond_proj_dim})")
    return earlier.state_dict()


class DDIMSolver:
    """The teacher's ODE solved one skip at a time on the 50 timesteps LCM samples on (k = N/50):
    t_{n+k} = k(n+1) − 1 for index n, and t_n = t_{n+k} − k (0 for the first: ᾱ_0, the script's ᾱ_prev)."""

    def __init__(self, alpha_bar: torch.Tensor):
        N = len(alpha_bar)
        self.k = N // LCM_ORIGINAL_STEPS
        self.start = torch.arange(1, LCM_ORIGINAL_STEPS + 1) * self.k - 1  # (50,) 19, 39, ..., 999
        self.end = (self.start - self.k).clamp(min=0)                       # (50,) 0, 19, ..., 979
        self.alpha_bar = alpha_bar

    def step(self, x0_hat: torch.Tensor, eps_hat: torch.Tensor, t_end: torch.Tensor) -> torch.Tensor:
        """DDIM with η = 0 (Song et al. 2021, eq. 12): ẑ_n = √ᾱ_n ẑ₀ + √(1−ᾱ_n) ε̂."""
        a = bcast(self.alpha_bar[t_end], x0_hat)
        return a.sqrt() * x0_hat + (1 - a).sqrt() * eps_hat


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1), on like's device."""
    return v.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def consistency_output(unet, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor, w_emb: torch.Tensor,
                       alpha_bar: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """f(z, t, w) = c_skip(t) z + c_out(t) x̂₀(z, t, w): the U-Net's ε (or v) as ẑ₀, through LCM's boundary
    condition (`samplers.lcm_scalings`, on 10·t: c_skip(0) = 1, c_out(0) = 0)."""
    out = unet(z, t, context, timestep_cond=w_emb).float()
    x0_hat = to_x0(out, z, bcast(alpha_bar[t], z), prediction_type)
    c_skip, c_out = lcm_scalings(t.float())
    return bcast(c_skip, z) * z + bcast(c_out, z) * x0_hat


@torch.no_grad()
def teacher_step(teacher: UNet, solver: DDIMSolver, z: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor,
                 cond: torch.Tensor, uncond: torch.Tensor, s: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """The guided teacher (one batch [∅, c]) at t_{n+k}, then one DDIM step to t_n: ẑ_n."""
    out_u, out_c = teacher(torch.cat([z, z]), torch.cat([t, t]), torch.cat([uncond, cond])).float().chunk(2)
    out = out_u + bcast(s, z) * (out_c - out_u)  # CFG (Ho & Salimans 2021, eq. 6), linear in ε or v alike
    a = bcast(solver.alpha_bar[t], z)
    return solver.step(to_x0(out, z, a, prediction_type), to_eps(out, z, a, prediction_type), t_end)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """mean √((pred − target)² + c²) − c: quadratic within c of the target, linear beyond (Song & Dhariwal 2023)."""
    return (torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c).mean()


@torch.no_grad()
def ema_track(target: UNet, student: UNet, decay: float) -> None:
    """θ⁻ ← d θ⁻ + (1 − d) θ at a constant d from the first step, as the LCM script's `update_ema`
    (loop.ema_update warms its decay up; a target network should trail the student by ~1/(1−d) steps)."""
    for p_ema, p in zip(target.parameters(), student.parameters()):
        p_ema.lerp_(p, 1 - decay)


def train_lcm(cfg: LCMConfig, force: bool = False) -> Path:
    """The distillation loop (this module's docstring); returns the folder the LCM pipeline was saved to."""
    out, work = Path(cfg.out), Path(cfg.work)
    refuse_overwrite(out, force)
    dist = Dist.from_env(cfg.device, {"--batch": cfg.batch})
    log, t0 = Log(work, dist.is_main), time.time()
    log(f"config: {json.dumps(asdict(cfg))}")
    pipe = StableDiffusion.from_pretrained(cfg.base, device=torch.device(cfg.device), dtype=torch.float32)
    prediction = pipe.scheduler.prediction_type  # the teacher's, and so the student's
    if prediction not in ("epsilon", "v_prediction") or pipe.unet.config.time_cond_proj_dim is not None:
        raise ValueError(f"--base {cfg.base!r}: the teacher must be an ε- or v-prediction model without a guidance input, "
                         f"got {pipe.scheduler.prediction_type!r}, time_cond_proj_dim "
                         f"{pipe.unet.config.time_cond_proj_dim}")
    device, teacher = pipe.device, pipe.unet
    for m in (teacher, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    scenes = lcm_scenes(cfg)
    _, means, stds = render_and_encode(pipe, scenes, log, t0)

    with seeded(cfg.seed):  # every weight is then overwritten by the teacher's (cond_proj by zeros)
        student = student_unet(teacher, cfg.time_cond_proj_dim)
    n_params = f"{sum(p.numel() for p in student.parameters()):,} parameters"
    if cfg.init:
        student.load_state_dict(earlier_student(cfg.init, student))
        log(f"student: continued from {cfg.init}'s U-Net (its cond_proj included), {n_params}")
    else:
        log(f"student: the teacher's U-Net + cond_proj ({cfg.time_cond_proj_dim} -> "
            f"{teacher.config.block_out_channels[0]}, zero), {n_params}")
    target = copy.deepcopy(student).requires_grad_(False).eval()
    student.requires_grad_(True).train()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    step0, losses = resume(work / "lcm.pt", log, model=student, ema=target, opt=opt)

    alpha_bar = pipe.scheduler.alphas_cumprod().to(device)
    solver = DDIMSolver(alpha_bar)
    with torch.no_grad():
        uncond = pipe.text_encoder(pipe.tokenizer([""], warn=False).to(device))  # (1, T, E): the teacher's ∅
    rng, g = np.random.default_rng(cfg.seed + step0), torch.Generator().manual_seed(cfg.seed + step0)
    bf16 = use_bf16(cfg.bf16, device)
    log(f"lcm: {'bfloat16 autocast' if bf16 else 'float32'}; k = {solver.k}, guidance scale s ~ "
        f"U[{cfg.guidance_min:g}, {cfg.guidance_max:g}], EMA target decay {cfg.ema_decay:g}; predicting {prediction}, "
        f"ᾱ at t = {len(alpha_bar) - 1}: {alpha_bar[-1].item():.4g}")
    state = lambda: dict(model=student.state_dict(), ema=target.state_dict(), opt=opt.state_dict())  # noqa: E731
    steps = Steps("lcm", step0, cfg.steps, log, work / "lcm.pt", cfg.checkpoint_minutes, losses, dist.is_main)
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        # the whole batch drawn as one process draws it, then this process's share of every draw
        idx = torch.randint(0, len(scenes), (cfg.batch,), generator=g)
        z0 = dist.share(latent_batch(pipe, means, stds, idx, g))
        captions = dist.share(draw_captions(scenes, idx, rng, 0.0))
        with torch.no_grad():
            cond = pipe.text_encoder(pipe.tokenizer(captions, warn=False).to(device))
        n = dist.share(torch.randint(0, LCM_ORIGINAL_STEPS, (cfg.batch,), generator=g))
        t, t_end = solver.start[n].to(device), solver.end[n].to(device)
        s = dist.share(cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(cfg.batch, generator=g))
        w_emb = guidance_scale_embedding(s - 1, cfg.time_cond_proj_dim).to(device)
        eps = dist.share(torch.randn((cfg.batch, *z0.shape[1:]), generator=g)).to(device)
        z = bcast(alpha_bar[t], z0).sqrt() * z0 + (1 - bcast(alpha_bar[t], z0)).sqrt() * eps  # eq. 2 at t_{n+k}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # the weights stay fp32
            z_end = teacher_step(teacher, solver, z, t, t_end, cond, uncond.expand(len(z), -1, -1), s.to(device),
                                 prediction)
            with torch.no_grad():
                goal = consistency_output(target, z_end, t_end, cond, w_emb, alpha_bar, prediction)
            loss = pseudo_huber(consistency_output(student, z, t, cond, w_emb, alpha_bar, prediction), goal,
                                cfg.huber_c)
        optimiser_step(loss, opt, list(student.parameters()), dist=dist)
        ema_track(target, student, cfg.ema_decay)
        steps.record(step, dist.all_mean(loss).item(), opt.param_groups[0]["lr"], state)
    steps.finish(state)
    if dist.is_main:
        save_lcm_pipeline(pipe, student.eval(), out)
        write_record(cfg, out, work, losses, time.time() - t0, step0, dist.world)
        log(f"saved the LCM pipeline to {out}; {(time.time() - t0) / 60:.1f} min")
    dist.barrier()  # the pipeline is in --out when any process returns
    return out


def save_lcm_pipeline(pipe: StableDiffusion, student: UNet, out: Path) -> None:
    """The base's VAE, text encoder and tokenizer with the student U-Net, fp16, in the diffusers layout that
    LatentConsistencyModelPipeline reads: its scheduler an LCMScheduler on the base's betas."""
    pipe.unet = student
    pipe.to("cpu", torch.float16)  # shipped in fp16, as the base model
    pipe.save_pretrained(out)
    scheduler = pipe.scheduler.to_diffusers("LCMScheduler")
    scheduler.pop("skip_prk_steps")  # PNDM's; LCMScheduler has no such field
    scheduler.update(original_inference_steps=LCM_ORIGINAL_STEPS, timestep_scaling=LCM_TIMESTEP_SCALING)
    write_json(out / "scheduler" / "scheduler_config.json", scheduler)
    index = json.loads((out / "model_index.json").read_text())
    index.update(_class_name="LatentConsistencyModelPipeline", scheduler=["diffusers", "LCMScheduler"])
    write_json(out / "model_index.json", index)


def write_record(cfg: LCMConfig, out: Path, work: Path, losses: list[float], seconds: float, step0: int,
                 processes: int = 1) -> None:
    """training.json beside the weights: the config, the minutes (of this run; it resumed at `step0`), the
    machine (and how many processes trained), every 10th loss; and the same timings in <work>/timings.json."""
    run_steps = max(cfg.steps - step0, 1)
    timings = {"train_minutes": round(seconds / 60, 2), "seconds_per_step": round(seconds / run_steps, 3),
               "steps_this_run": cfg.steps - step0, "resumed_at": step0}
    write_json(work / "timings.json", timings)
    record = {"command": "minisd train lcm", "config": asdict(cfg), "minutes": timings,
              "machine": {"device": cfg.device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "platform": platform.platform(), "processes": processes},
              "loss_every_10_steps": [round(x, 6) for x in losses[::10]]}
    write_json(out / "training.json", record)


def main(argv: list[str] | None = None) -> Path:
    """`minisd train lcm [--flags]`: distil the finished model (--base) into a latent consistency model."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="minisd train lcm", description=__doc__.split("\n\n")[0])
    config_flags(parser, LCMConfig)
    parser.add_argument("--fresh", action="store_true", help="ignore the checkpoint in --work and start over")
    parser.add_argument("--force", action="store_true", help="overwrite a model already in --out")
    args = parser.parse_args(argv)
    cfg = config_from(args, LCMConfig)  # refuses careless values
    if args.fresh:
        (Path(cfg.work) / "lcm.pt").unlink(missing_ok=True)
    return train_lcm(cfg, force=args.force)
