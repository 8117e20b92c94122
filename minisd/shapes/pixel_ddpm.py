"""DDPM in pixel space, the model of notebook 02: one-object shapes-world scenes at 16×16, a 284k-parameter
U-Net, the ε-prediction loss of Ho et al. (2020) on the linear schedule. No text, no VAE.

The notebook writes the network and the loop by hand, checks them against this module, trains 600 steps
live and then continues from the checkpoint shipped in data/ddpm_pixels/, which this module trains:

    python -m minisd.shapes.pixel_ddpm --steps 2000 --out data/ddpm_pixels
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..diffusion import schedules
from ..nn.layers import Downsample2D, ResnetBlock2D, TimestepEmbedding, Upsample2D, timestep_embedding
from .loop import ema_update, seeded
from .world import dataset

N = 1000            # training timesteps (Ho et al. 2020)
SHIPPED = Path(__file__).resolve().parents[2] / "data" / "ddpm_pixels"


class PixelUNet(nn.Module):
    """ε_θ(x_t, t) for (B, 3, 16, 16) pictures: one down level, a bottleneck at 8×8, one up level with a skip.
    Built from the blocks of SD's U-Net; c channels at 16×16, 2c at 8×8."""

    def __init__(self, c: int = 32):
        super().__init__()
        self.c = c
        self.time = TimestepEmbedding(c, 4 * c)                    # sinusoid -> MLP -> (B, 4c)
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.block1 = ResnetBlock2D(c, c, 4 * c, 8, 1e-5)          # 16×16
        self.down = Downsample2D(c)                                # -> 8×8
        self.mid1 = ResnetBlock2D(c, 2 * c, 4 * c, 8, 1e-5)
        self.mid2 = ResnetBlock2D(2 * c, 2 * c, 4 * c, 8, 1e-5)
        self.up = Upsample2D(2 * c)                                # -> 16×16
        self.block2 = ResnetBlock2D(3 * c, c, 4 * c, 8, 1e-5)      # after concatenating the skip
        self.norm_out = nn.GroupNorm(8, c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.c))             # (B, 4c)
        skip = self.block1(self.conv_in(x), emb)                   # (B, c, 16, 16)
        h = self.mid2(self.mid1(self.down(skip), emb), emb)        # (B, 2c, 8, 8)
        h = self.block2(torch.cat([self.up(h), skip], dim=1), emb)  # (B, c, 16, 16)
        return self.conv_out(F.silu(self.norm_out(h)))


def pixel_data(n: int = 2000, seed: int = 3) -> torch.Tensor:
    """n one-object scenes box-filtered from 64×64 to 16×16: (n, 3, 16, 16) in [-1, 1]."""
    images, _, _ = dataset(n, seed=seed, p_two=0.0)
    return F.avg_pool2d(images, 4)


def train(net: nn.Module, x_data: torch.Tensor, steps: int, *, batch: int = 48, lr: float = 2e-3,
          generator: torch.Generator, ema: nn.Module | None = None, start: int = 0,
          opt: torch.optim.Optimizer | None = None) -> list[float]:
    """`steps` steps of L = ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² (notebook 02, eq. 1) with AdamW at a constant lr.
    Draws, per step, the batch, then t, then ε from `generator`: the notebook's loop, draw for draw.
    `ema`, if given, follows the weights (shapes/loop.py's ema_update, counted from `start`); pass `opt` to go on
    with an optimiser's state. Returns the losses."""
    if steps < 0 or batch < 1 or lr <= 0:
        raise ValueError(f"need steps >= 0, batch >= 1, lr > 0; got steps={steps}, batch={batch}, lr={lr}")
    abar = schedules.alphas_cumprod(schedules.linear_betas(N))
    opt = opt or torch.optim.AdamW(net.parameters(), lr=lr)
    losses = []
    for step in range(start, start + steps):
        x0 = x_data[torch.randint(0, len(x_data), (batch,), generator=generator)]
        t = torch.randint(0, N, (batch,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        loss = F.mse_loss(net(schedules.q_sample(x0, t, eps, abar), t), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            ema_update(ema, net, step)
        losses.append(loss.item())
    return losses


def load(folder: str | Path = SHIPPED) -> tuple[PixelUNet, dict]:
    """The shipped checkpoint: (network in eval mode, float32, the EMA weights; its training record)."""
    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"no model.safetensors in {str(folder)!r}: expected a folder written by pixel_ddpm.main")
    record = json.loads((folder / "training.json").read_text())
    net = PixelUNet(record["channels"])
    net.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()}, strict=True)
    return net.eval(), record


def main(argv: list[str] | None = None) -> None:
    """Train from seed 0 (the notebook's 600 live steps are this run's first 600) and write the EMA weights
    in float16 with a JSON of how they were made, every `--every` steps (a stopped run keeps its last save)."""
    ap = argparse.ArgumentParser(description="Train notebook 02's pixel-space DDPM on 16×16 shapes.")
    ap.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    ap.add_argument("--every", type=int, default=500, help="save every this many steps (default 500)")
    ap.add_argument("--out", default=str(SHIPPED), help="folder to write model.safetensors and training.json")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.every < 1:
        raise ValueError(f"--steps and --every must be >= 1, got {args.steps} and {args.every}")
    with seeded(0):                       # the same initial weights as notebook 02 (seed 0, then the network)
        net = PixelUNet()
    x_data = pixel_data()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt, g, losses, began = torch.optim.AdamW(net.parameters(), lr=2e-3), torch.Generator().manual_seed(0), [], time.time()
    while len(losses) < args.steps:
        n = min(args.every, args.steps - len(losses))
        losses += train(net, x_data, n, generator=g, ema=ema, start=len(losses), opt=opt)
        save(Path(args.out), ema, losses, round(time.time() - began))
        print(f"{len(losses)} steps, {time.time() - began:.0f}s, loss {sum(losses[-100:]) / 100:.4f}", flush=True)


def save(out: Path, ema: PixelUNet, losses: list[float], seconds: int) -> None:
    """model.safetensors (the EMA weights in float16) and training.json (how they were made, the loss curve)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in ema.state_dict().items()}, out / "model.safetensors")
    every = max(1, len(losses) // 100)
    record = {"command": f"python -m minisd.shapes.pixel_ddpm --steps {len(losses)}",
              "function": "minisd.shapes.pixel_ddpm.train", "channels": ema.c, "steps": len(losses), "batch": 48,
              "lr": 2e-3, "optimiser": "AdamW, constant lr", "ema_decay": 0.999, "data": "pixel_data(2000, seed=3)",
              "seed": 0, "weights": "EMA, float16", "seconds": seconds, "threads": torch.get_num_threads(),
              "loss_every": every, "loss": [round(sum(losses[i:i + every]) / len(losses[i:i + every]), 5)
                                            for i in range(0, len(losses), every)]}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
