"""The decoder-only fine-tuning loop shared by decoder_contrast.py and decoder_small_spiky.py.

As the recipe's decoder phases (minisd.train.train_vae): encoder frozen, so every latent stays what
it was; a warm-up of 50 steps to `lr`; the edge-weighted reconstruction loss; each batch a mix of
training scenes and `n_clutter` clutter pictures; half of the latents over-contrasted up to `kmax`
(`share` of them; kmax 1 = none)."""

import time

import numpy as np
import torch

from minisd import shapes
from minisd.train import Log, TrainConfig, make_data, over_contrast, reconstruction_loss, to_float


def recipe_pictures(work) -> tuple[TrainConfig, torch.Tensor]:
    """The recipe's config and its training pictures (uint8), rendered as `minisd train` renders them."""
    cfg = TrainConfig()
    return cfg, make_data(cfg, Log(work))[0]


def clutter_pictures(n: int, seed: int, spiky: float, radius=(5, 17)) -> torch.Tensor:
    """n clutter pictures (shapes.clutter, seeds seed, seed + 1, ...) as uint8 (n, 3, 64, 64)."""
    return torch.stack([torch.from_numpy(np.array(shapes.clutter(seed + i, spiky, radius))).permute(2, 0, 1)
                        for i in range(n)])


def finetune_decoder(vae, images, extra, *, steps: int, lr: float, batch: int, n_clutter: int, kmax: float,
                     share: float, edge_weight: float, seed: int, log_every: int):
    vae = vae.float().train()
    vae.encoder.requires_grad_(False), vae.quant_conv.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        idx = torch.randint(0, len(images), (batch - n_clutter,), generator=g)
        x = to_float(torch.cat([images[idx], extra[torch.randint(0, len(extra), (n_clutter,), generator=g)]]), "cpu")
        with torch.no_grad():
            post = vae.encode(x)
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            z = over_contrast(z, kmax, g, share)  # the recipe's augmentation
        loss = reconstruction_loss(vae.decode(z), x, edge_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step}: rec {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    return vae
