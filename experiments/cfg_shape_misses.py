"""Why CFG 7.5 loses to CFG 1 on shape (issue #4): the one-object shape misses, by size and by what
was read, and whether the guided latents are simply over-contrasted.

    python experiments/cfg_shape_misses.py [MODEL]

For each guidance scale: the 180 one-object prompts of `minisd eval` (seeds 0-179, 25 DDIM steps),
the misses (asked shape -> read shape, asked size), and the shape accuracy after decoding the same
final latents with their spatial contrast scaled by k (z' = mean + k·(z − mean), per image and channel):
if CFG's misses were only an overshoot, k < 1 would give them back.
"""

import sys
from collections import Counter

import torch

from minisd import StableDiffusion
from minisd.eval import analyse, eval_prompts, generate_for, parse, score
from minisd.generate import decode_latents, to_pil

torch.set_grad_enabled(False)
pipe = StableDiffusion.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else "tiny")
pipe.progress = False
prompts = [p for p in eval_prompts() if " and " not in p]
for cfg in (7.5, 1.0):
    z = torch.stack(generate_for(pipe, prompts, cfg, output_type="latent"))  # the noise of `minisd eval`
    images = to_pil(decode_latents(pipe, z))
    misses = Counter()
    for prompt, image in zip(prompts, images):
        want = parse(prompt)[0][0]
        a = analyse(image)
        obj = a.find(want.colour) or (a.objects[0] if a.objects else None)
        if obj is None or obj.shape != want.shape:
            split = obj is not None and len(a.objects) > 1  # the object came out in two palette colours
            misses[(want.size, want.shape, obj.shape if obj else None, "split" if split else "")] += 1
    print(f"CFG {cfg:g}: {sum(misses.values())} shape misses of {len(prompts)}")
    for key, n in sorted(misses.items(), key=str):
        print("   ", key, n)
    mean = z.mean((2, 3), keepdim=True)
    for k in (0.85, 0.92, 1.0, 1.08):
        r = score(prompts, to_pil(decode_latents(pipe, mean + k * (z - mean))))["one"]
        print(f"  contrast x{k}: shape {r['shape']:.1%}, colour {r['colour']:.1%}", flush=True)
