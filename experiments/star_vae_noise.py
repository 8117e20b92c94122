"""Is the VAE what stops small stars? Ground-truth star renders (the 60 prompts of `minisd eval --lora`),
encoded, Gaussian noise of σ (in the U-Net's scaled latent units) added, decoded, judged: the share
still read as a star, small and large.

    python experiments/star_vae_noise.py
"""

import torch

from minisd import StableDiffusion
from minisd.eval import analyse, concept_prompts, parse, render_prompt
from minisd.generate import to_pil
from minisd.shapes import to_tensor

torch.set_grad_enabled(False)
pipe = StableDiffusion.from_pretrained("tiny"); sf = pipe.vae.scaling_factor
for size in ("small", "large"):
    prompts = [p for p in concept_prompts("star") if size in p]
    x = torch.stack([to_tensor(render_prompt(p, i)) for i, p in enumerate(prompts)])
    z = pipe.vae.encode(x).mean
    for sigma in (0.0, 0.05, 0.1, 0.2, 0.3):
        zz = z + sigma / sf * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
        ims = to_pil((pipe.vae.decode(zz) / 2 + 0.5).clamp(0, 1))
        ok = 0
        for p, im in zip(prompts, ims):
            w = parse(p)[0][0]; a = analyse(im); o = a.find(w.colour) or (a.objects[0] if a.objects else None)
            ok += o is not None and o.shape == "star"
        print(size, sigma, ok / len(prompts), flush=True)
