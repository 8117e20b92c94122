"""Can a VAE decoder that has seen over-contrasted latents take back what strong guidance costs (issue #4)?

    python experiments/decoder_contrast.py KMAX SHARE STEPS [LR]     # one trial; KMAX 1 = no augmentation

CFG 7.5 overshoots: its final latents are a little over-contrasted (`cfg_shape_misses.py`: decoding
them with their spatial contrast scaled by 0.92 gives back 2 of CFG 7.5's 5 missing shape points).
The decoder has only ever seen the encoder's latents. This fine-tunes the shipped decoder (encoder
frozen, so latents, scaling factor and U-Net are unchanged) for STEPS steps as the recipe's
decoder-only phase does, except that a SHARE of each batch has its latents' spatial contrast raised,
z' = m + k·(z − m) with k ~ U(1, KMAX) per picture (m: the spatial mean per channel), while the
target stays the clean picture. Then it decodes the *same* final latents of `minisd eval`'s 240
prompts (CFG 7.5 and 1, seeds 0-239, DDIM 25 steps; sampled once with the shipped U-Net and cached
in /tmp/dc) with the shipped and with the new decoder, and scores both. The U-Net does not change,
so only the decoding is being compared.

The logged trials (decoder_contrast.log) started from session 8's decoder, the one shipped then; the
shipped decoder has had the phase since. To repeat them, put that VAE file back first:
`git show 4e8e38e:data/tiny/vae/diffusion_pytorch_model.safetensors > data/tiny/vae/diffusion_pytorch_model.safetensors`.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minisd import StableDiffusion
from minisd.eval import eval_prompts, generate_for, score
from minisd.generate import decode_latents, to_pil
from minisd import shapes
from minisd.train import Log, TrainConfig, make_data, over_contrast, reconstruction_loss, to_float

kmax, share, steps = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 2e-4
cache = Path("/tmp/dc")
cache.mkdir(exist_ok=True)
prompts = eval_prompts()
pipe = StableDiffusion.from_pretrained("tiny")
pipe.progress = False

latents_file = cache / "latents.pt"
if not latents_file.is_file():
    with torch.no_grad():  # the noise of `minisd eval`: prompt i from seed i
        z = {cfg: torch.stack(generate_for(pipe, prompts, cfg, output_type="latent")) for cfg in (7.5, 1.0)}
    torch.save(z, latents_file)
z = torch.load(latents_file)


def report(label: str) -> dict:
    pipe.vae.eval()
    rows = {}
    with torch.no_grad():
        for cfg, zc in z.items():
            r = score(prompts, to_pil(decode_latents(pipe, zc)))
            rows[cfg] = r
            one, two = r["one"], r["two"]
            print(f"{label:>28} CFG {cfg:>3g}: colour {one['colour']:.1%} shape {one['shape']:.1%} "
                  f"position {one['position']:.1%} size {one['size']:.1%} background {one['background']:.1%} "
                  f"two: both {two['both']:.1%}", flush=True)
    return rows


if not (cache / "baseline.json").is_file():
    (cache / "baseline.json").write_text(json.dumps(report("shipped decoder")))
if steps == 0:
    sys.exit()

cfg = TrainConfig()
images, _ = make_data(cfg, Log(cache))
extra = torch.stack([torch.from_numpy(np.array(shapes.clutter(900_000_000 + i, cfg.vae_spiky)))
                     .permute(2, 0, 1) for i in range(len(images) // 4)])
vae = pipe.vae.float().train()
vae.encoder.requires_grad_(False), vae.quant_conv.requires_grad_(False)
opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
g = torch.Generator().manual_seed(11)
n_clutter = round(cfg.vae_batch * cfg.vae_clutter)
t0 = time.time()
for step in range(steps):
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / 50)
    idx = torch.randint(0, len(images), (cfg.vae_batch - n_clutter,), generator=g)
    x = to_float(torch.cat([images[idx], extra[torch.randint(0, len(extra), (n_clutter,), generator=g)]]), "cpu")
    with torch.no_grad():
        post = vae.encode(x)
        zz = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        zz = over_contrast(zz, kmax, g, share)  # the recipe's augmentation (the same random draws as the logged runs)
    loss = reconstruction_loss(vae.decode(zz), x, cfg.vae_edge_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    if step % 100 == 0 or step == steps - 1:
        print(f"step {step}: rec {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
name = f"k{kmax:g}_p{share:g}_s{steps}_lr{lr:g}"
torch.save(vae.state_dict(), cache / f"vae_{name}.pt")
report(name)
