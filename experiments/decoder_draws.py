"""Score saved decoders (written by experiments/decoder_contrast.py as /tmp/dc/vae_NAME.pt) on another
noise draw of `minisd eval`'s 240 prompts: the U-Net's final latents at CFG 7.5 and 1 from seeds
SEED + i (default 1000; cached in /tmp/dc), decoded by each decoder. The U-Net is the shipped one
(unchanged by the decoder phase), so the latents are the same whichever decoder is shipped.

    SEED=1000 python experiments/decoder_draws.py NAME [NAME ...]

In the log, `old` is session 8's decoder and `ship1` the shipped one, saved the same way as the
trials' (`torch.save(StableDiffusion.from_pretrained(FOLDER).vae.state_dict(), "/tmp/dc/vae_NAME.pt")`,
FOLDER a copy of data/tiny holding that VAE file).
"""

import os
import sys
from pathlib import Path

import torch

from minisd import StableDiffusion
from minisd.eval import eval_prompts, generate_for, score
from minisd.generate import decode_latents, to_pil

torch.set_grad_enabled(False)
seed = int(os.environ.get("SEED", 1000))
prompts = eval_prompts()
pipe = StableDiffusion.from_pretrained("tiny")
pipe.progress = False
cache = Path(f"/tmp/dc/latents_{seed}.pt")
if not cache.is_file():
    # as `minisd eval --seed SEED`: prompt i from seed SEED + i
    z = {cfg: torch.stack(generate_for(pipe, prompts, cfg, seed=seed, output_type="latent")) for cfg in (7.5, 1.0)}
    cache.parent.mkdir(exist_ok=True)
    torch.save(z, cache)
z = torch.load(cache)
for name in sys.argv[1:]:
    pipe.vae.load_state_dict(torch.load(f"/tmp/dc/vae_{name}.pt"))
    for cfg, zc in z.items():
        r = score(prompts, to_pil(decode_latents(pipe, zc)))
        one, two = r["one"], r["two"]
        print(f"{name:>28} seeds {seed}+ CFG {cfg:>3g}: colour {one['colour']:.1%} shape {one['shape']:.1%} "
              f"position {one['position']:.1%} size {one['size']:.1%} background {one['background']:.1%} "
              f"two: both {two['both']:.1%}", flush=True)
