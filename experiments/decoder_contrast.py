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
from pathlib import Path

import torch

from minisd import StableDiffusion
from minisd.eval import eval_prompts, generate_for, score
from minisd.generate import decode_latents, to_pil

from decoder_finetune import clutter_pictures, finetune_decoder, recipe_pictures

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

cfg, images = recipe_pictures(cache)
extra = clutter_pictures(len(images) // 4, 900_000_000, cfg.vae_spiky)
vae = finetune_decoder(pipe.vae, images, extra, steps=steps, lr=lr, batch=cfg.vae_batch, n_clutter=round(cfg.vae_batch * cfg.vae_clutter),
                       kmax=kmax, share=share, edge_weight=cfg.vae_edge_weight, seed=11, log_every=100)
name = f"k{kmax:g}_p{share:g}_s{steps}_lr{lr:g}"
torch.save(vae.state_dict(), cache / f"vae_{name}.pt")
report(name)
