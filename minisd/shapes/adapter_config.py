"""What the loops that train on the finished model share: their config, the base model loaded frozen,
the data rendered and encoded once, a batch of latents and captions, the record written at the end, and
the processes they run on (dist.py: --batch is global, each of N processes takes an equal share).

The loops themselves: train_lora.py, train_controlnet.py, train_inpaint.py, train_ti.py, train_dreambooth.py
(DreamBooth and DreamBooth-LoRA);
`finetune.py` starts them.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..pipeline import StableDiffusion
from . import world
from .dist import Dist
from .loop import Log, check_config, refuse_overwrite, write_json

KINDS = ("lora", "controlnet", "inpaint", "textual-inversion", "dreambooth", "dreambooth-lora")
PRIOR_KINDS = ("dreambooth", "dreambooth-lora")  # the kinds that keep the prior with the base model's own pictures

# what each kind changes from AdapterConfig's defaults (those of the star LoRA): `AdapterConfig.of`
KIND_DEFAULTS = {"lora": {}, "controlnet": {"steps": 300, "batch": 32, "lr": 1e-3, "warmup": 30, "n_images": 8000},
                 "inpaint": {"steps": 1500, "batch": 32, "lr": 1e-3, "warmup": 30, "n_images": 8000},
                 "textual-inversion": {"steps": 600, "lr": 5e-3, "caption_dropout": 0.0},
                 "dreambooth": {"steps": 800, "lr": 1e-4},
                 "dreambooth-lora": {}}  # the LoRA's rank, layers, rate and steps, DreamBooth's data and prior


@dataclass(frozen=True)
class AdapterConfig:
    kind: str = "lora"                # "lora", "controlnet", "inpaint", "textual-inversion", "dreambooth", "dreambooth-lora"
    model: str = "tiny"               # the frozen base model
    out: str = ""                     # default: runs/<kind>/tiny_star_lora, tiny_controlnet_edges or tiny_inpaint
    work: str = ""                    # default: runs/<kind>
    device: str = "cpu"
    seed: int = 0
    n_images: int = 4000
    steps: int = 800                  # the star LoRA: 1,600 steps did no better (experiments/star_lora_trials.md)
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 20
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1      # the ControlNet drops half its captions whatever this says (train_controlnet.py)
    bf16: str = "auto"                # bfloat16 autocast, as for the base model (loop.use_bf16)
    # LoRA
    concept: str = "star"             # the new shape; half of the training pictures show it
    rank: int = 64
    alpha: float = 64.0
    # every Linear and Conv2d of the U-Net (kohya's LoCon "all layers"): a new *shape*, drawn at 3.5 latent
    # cells when small, needs capacity everywhere. Attention alone learnt `star` far more slowly; kohya's
    # transformer set + ResBlock convs at rank 16 drew 2 small stars of 30, this 8 (62% stars against 53%)
    targets: str = ("to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,"
                    "conv,conv_in,conv_out,time_emb_proj,linear_1,linear_2")
    # and optionally the text encoder's (kohya's `lora_te_`), for a word the frozen CLIP never learnt. For the
    # star it bought nothing (53% star shape with or without; 62% and 62% on every layer): drawing the shape, not
    # naming it, is the hard part
    te_targets: str = ""              # e.g. "q_proj,k_proj,v_proj,out_proj,fc1,fc2"; "" = the U-Net only
    te_lr_scale: float = 1.0          # the text encoder's rate relative to --lr
    # Where the loss looks. A plain loss averages over every latent number; a small star's five notches are about
    # 4 of the 256 cells and weigh nothing, so the base model's habit of filling them in costs the LoRA nothing to
    # keep. Each cell's squared error is weighted 1 + notch_weight · its share of notch (inside an object's convex
    # hull, outside the object: world.notches, none for the convex base shapes) + outline_weight · its share of
    # outline (loop.edge_map, every object: the ordinary half's shapes are guarded as hard as the stars'
    # notches), and each picture's weights are scaled to average 1, so star pictures do not outweigh the
    # ordinary half. 0, 0: the plain loss. Small stars drawn: 21 of 90 plain, 50-58 so (star shape 62 -> 76-81%,
    # base shapes 94-97%); notches alone cut notches into triangles too (experiments/star_lora_trials.md)
    notch_weight: float = 300.0
    outline_weight: float = 100.0
    # textual inversion: a new token <concept>, its vectors learnt, every weight frozen
    num_vectors: int = 1              # vectors the token stands for (several: <star>, <star>_1, ...)
    init_word: str = "triangle"       # the vectors start as this word's embedding: the nearest thing the model draws
    # DreamBooth: the whole U-Net fine-tuned on the concept's pictures, plus (Ruiz et al. 2023) the prior loss on
    # the base model's own pictures of ordinary prompts, weighted by prior_loss_weight; 0 = no prior preservation
    prior_loss_weight: float = 1.0
    n_class_images: int = 400         # the base model's pictures for the prior (DDIM 25 steps, CFG 7.5)
    prior_outline_weight: float = 100.0  # the prior's loss weighted onto outlines as the LoRA's ordinary half; 0: plain
    # ControlNet
    control: str = "edges"            # "edges" or "mask" (world.control_map)
    checkpoint_minutes: float = 5.0

    def __post_init__(self):  # careless input is refused before any work
        check_config(self, at_least_1=("n_images", "steps", "batch", "rank", "num_vectors", "n_class_images"),
                     at_least_0=("seed", "warmup"),
                     above_0=("lr", "alpha", "min_snr_gamma", "te_lr_scale", "checkpoint_minutes"),
                     not_negative=("notch_weight", "outline_weight", "prior_loss_weight", "prior_outline_weight"),
                     shares=("caption_dropout",),
                     choices={"kind": KINDS, "bf16": ("yes", "no", "auto"), "concept": world.SHAPES,
                              "control": ("edges", "mask")})
        if self.kind in PRIOR_KINDS and self.prior_loss_weight > 0 and self.batch < 2:
            raise ValueError(f"--batch must be at least 2 with prior preservation (half concept, half prior), "
                             f"got {self.batch}")
        if not self.targets.strip(","):
            raise ValueError(f"--targets must name at least one layer, e.g. 'to_q,to_v', got {self.targets!r}")

    @classmethod
    def of(cls, kind: str, **changes) -> AdapterConfig:
        """The config `minisd train <kind>` starts from (AdapterConfig's defaults with KIND_DEFAULTS[kind]), with
        `changes`: what Python callers should use, e.g. AdapterConfig.of("textual-inversion", steps=30)."""
        if kind not in KIND_DEFAULTS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return cls(kind=kind, **{**KIND_DEFAULTS[kind], **changes})

    def paths(self) -> tuple[Path, Path]:
        """(out, work): where the result goes (never into data/ by default) and the checkpoints and log."""
        name = {"lora": f"tiny_{self.concept}_lora", "controlnet": f"tiny_controlnet_{self.control}",
                "inpaint": "tiny_inpaint", "textual-inversion": f"tiny_{self.concept}_embedding",
                "dreambooth": f"tiny_{self.concept}_dreambooth",
                "dreambooth-lora": f"tiny_{self.concept}_dreambooth_lora"}[self.kind]
        work = Path(self.work or f"runs/{self.kind}")
        return Path(self.out or work / name), work


def start(cfg: AdapterConfig, force: bool) -> tuple[Path, Path, Log, StableDiffusion, Dist]:
    """Before any loop: refuse to overwrite a result (unless `force`), join the other processes if torchrun
    started several (a --batch they cannot share equally is refused), open the log (rank 0's), load the base
    model frozen (fp32, eval mode, no gradients). Returns (out, work, log, pipe, dist)."""
    out, work = cfg.paths()
    refuse_overwrite(out, force)
    shares = {"--batch": cfg.batch}
    if cfg.kind in PRIOR_KINDS and cfg.prior_loss_weight > 0:  # the concept's half and the prior's, each shared
        shares["half of --batch"] = cfg.batch // 2
    dist = Dist.from_env(cfg.device, shares)
    log = Log(work, dist.is_main)
    log(f"config: {json.dumps(asdict(cfg))}")
    pipe = StableDiffusion.from_pretrained(cfg.model, device=torch.device(cfg.device), dtype=torch.float32)
    pipe.progress = False
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    return out, work, log, pipe, dist


@torch.no_grad()
def encode_all(pipe: StableDiffusion, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of every picture, once: (means, stds), each (N, 4, h, w), on the CPU."""
    means, stds = [], []
    for i in range(0, len(images), 250):
        post = pipe.vae.encode(images[i:i + 250].to(pipe.device, pipe.dtype))
        means.append(post.mean.float().cpu()), stds.append(post.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def render_and_encode(pipe: StableDiffusion, scenes: list[world.Scene], log: Log, t0: float):
    """(images (N, 3, 64, 64) in [-1, 1], latent means, latent stds)."""
    images = torch.stack([world.to_tensor(world.render(s)) for s in scenes])
    means, stds = encode_all(pipe, images)
    log(f"data: {len(scenes)} scenes rendered and encoded in {time.time() - t0:.0f}s")
    return images, means, stds


def latent_batch(pipe: StableDiffusion, means: torch.Tensor, stds: torch.Tensor, idx: torch.Tensor,
                 g: torch.Generator) -> torch.Tensor:
    """z₀ for the scenes `idx`: a fresh draw from each picture's posterior, scaled as the U-Net sees it."""
    z0 = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)
    return z0.to(pipe.device) * pipe.vae.scaling_factor


def draw_captions(scenes: list[world.Scene], idx: torch.Tensor, rng: np.random.Generator, dropout: float,
                  positions: bool = True) -> list[str]:
    """One caption per scene, re-drawn each time (which attributes get named varies), `dropout` of them ""."""
    return ["" if rng.random() < dropout else world.make_caption(copy.copy(scenes[i]), rng, positions=positions)
            for i in idx.tolist()]


def finish(cfg: AdapterConfig, out: Path, work: Path, log: Log, t0: float, dist: Dist,
           seconds_per_step: float | None = None) -> Path:
    """After the loop (rank 0 has saved the result): the timings (`seconds_per_step`: the loop's own, `Steps`),
    and every process waits until it is all written."""
    if dist.is_main:
        timings = {"train_minutes": round((time.time() - t0) / 60, 1), "steps": cfg.steps, "batch": cfg.batch}
        if seconds_per_step is not None:
            timings["seconds_per_step"] = round(seconds_per_step, 4)
        write_json(work / "timings.json", timings)
        if out.is_dir():  # beside the result: what made it, and in what time on what machine
            machine = {"device": cfg.device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "processes": dist.world, "torch": torch.__version__, "platform": platform.platform(),
                       # the other work the machine had: a load above the cores means the minutes were shared
                       "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}
            write_json(out / "training.json", {"command": f"minisd train {cfg.kind}", "config": asdict(cfg),
                                               "minutes": timings, "machine": machine})
        log(f"saved to {out}; {timings}")
    dist.barrier()
    return out
