"""Where do the LoRA's small stars die? Start from perfect ones and let the model denoise them.

    python experiments/star_sdedit.py LORA|none [SHAPE] [STRENGTHS]
    python experiments/star_sdedit.py data/tiny_star_lora star 0.1,0.2,0.3,0.4,0.5,0.6,0.8
    CFG=1 EMPTY=1 python experiments/star_sdedit.py none star 0.1    # guidance 1, the empty prompt

The 30 small-shape prompts of `minisd eval --lora` ("a small red star on the left", ...), each with
its ground-truth picture (eval.render_prompt), run through img2img at growing strength (25 DDIM steps,
CFG 7.5, seed i for prompt i): strength s noises the picture's latents to step (1 − s)·25 and denoises
the rest of the way. Printed: how many still read as the asked shape. Strength → 0 is the VAE's
round trip (`minisd eval --vae`); a drop between two strengths is what the model does in that band of
noise levels. CFG sets the guidance scale; EMPTY=1 denoises with the empty prompt instead.
"""

import os
import sys

import torch

from minisd import StableDiffusion
from minisd.eval import concept_prompts, judge, render_prompt

pipe = StableDiffusion.from_pretrained("tiny")
pipe.progress = False
if sys.argv[1] != "none":
    pipe.load_lora(sys.argv[1])
shape = sys.argv[2] if len(sys.argv) > 2 else "star"
strengths = [float(v) for v in (sys.argv[3] if len(sys.argv) > 3 else "0.1,0.2,0.3,0.4,0.5,0.6,0.8").split(",")]
prompts = [p for p in concept_prompts(shape) if " small " in p]
pictures = [render_prompt(p, seed=i) for i, p in enumerate(prompts)]
for s in strengths:
    out = []
    for i, (prompt, picture) in enumerate(zip(prompts, pictures)):
        out += pipe.img2img("" if os.environ.get("EMPTY") == "1" else prompt, picture, strength=s, num_inference_steps=25,
                            guidance_scale=float(os.environ.get("CFG", "7.5")),
                            generator=torch.Generator().manual_seed(i))
    ok = sum(judge(p, im)["shape"] for p, im in zip(prompts, out))
    print(f"{sys.argv[1]} {shape} strength {s} (CFG {os.environ.get('CFG', '7.5')}"
          f"{', empty prompt' if os.environ.get('EMPTY') == '1' else ''}): {ok}/{len(prompts)} small {shape}s read as {shape}s",
          flush=True)
