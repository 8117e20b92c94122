"""Pilot: a VAE from scratch on world + clutter pictures with the edge-weighted reconstruction loss
(minisd.train.reconstruction_loss); its round-trip shape ceiling (eval.evaluate_vae) every 500 steps.

    python experiments/vae_pilot.py WIDTHS STEPS CLUTTER_SHARE EDGE_WEIGHT SPIKY_SHARE
"""
import math, time, sys, json, numpy as np, torch
from dataclasses import replace
from minisd import shapes, TINY
from minisd.vae import AutoencoderKL
import minisd.eval as ev
from pathlib import Path
Path("runs/experiments").mkdir(parents=True, exist_ok=True)
from minisd.train import reconstruction_loss
chans = tuple(int(c) for c in sys.argv[1].split(","))
steps = int(sys.argv[2]); frac = float(sys.argv[3]); lam = float(sys.argv[4]); spiky = float(sys.argv[5])
torch.manual_seed(0)
cfg = replace(TINY.vae, block_out_channels=chans)
vae = AutoencoderKL(cfg).to(memory_format=torch.channels_last)
print(cfg, sum(p.numel() for p in vae.parameters()) / 1e6, "M params, lambda", lam, flush=True)
N = 20000
Xw = torch.stack([torch.from_numpy(np.array(shapes.render(shapes.make_scene(i)))).permute(2, 0, 1) for i in range(N)])
Xc = torch.stack([torch.from_numpy(np.array(shapes.clutter(10**9 + i, spiky))).permute(2, 0, 1) for i in range(N // 2)])
f = lambda u8: (u8.float() / 127.5 - 1).contiguous(memory_format=torch.channels_last)
class P:
    device = torch.device("cpu")
    def __init__(self, vae): self.vae = vae
opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0)
g = torch.Generator().manual_seed(1); t0 = time.time(); nc = int(32 * frac)
for step in range(steps):
    for gr in opt.param_groups: gr["lr"] = 1e-3 * min(1, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
    x = f(torch.cat([Xw[torch.randint(0, N, (32 - nc,), generator=g)], Xc[torch.randint(0, N // 2, (nc,), generator=g)]]))
    xh, post = vae(x)
    loss = reconstruction_loss(xh, x, lam) + 1e-6 * post.kl().mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0); opt.step()
    if (step + 1) % 500 == 0 or step + 1 == steps:
        vae.eval(); res = ev.evaluate_vae(P(vae)); vae.train()
        print(step + 1, f"{time.time() - t0:.0f}s ({(time.time() - t0) / (step + 1):.2f} s/step)", json.dumps(res), flush=True)
        torch.save(vae.state_dict(), f"runs/experiments/vae_{sys.argv[1].replace(',', '_')}_{lam:g}_{spiky:g}.pt")
