"""One-object adherence of a model for several (sampler, CFG, seed) settings, 180 prompts each.

    python experiments/cfg_samplers.py MODEL SAMPLER:CFG:SEED ...

SEED is the first noise seed (prompt i uses seed + i), as `minisd eval --seed`. Log: cfg_samplers.log
(`python experiments/cfg_samplers.py tiny ddim:7.5:1000 dpmpp_2m:7.5:0 euler:7.5:0 pndm:7.5:0 ddim:1:1000`).
"""
import sys
import time

from minisd import StableDiffusion
from minisd.eval import eval_prompts, generate_for, score

pipe = StableDiffusion.from_pretrained(sys.argv[1]); pipe.progress = False
prompts = [p for p in eval_prompts() if " and " not in p]
for spec in sys.argv[2:]:
    sampler, cfg, seed = spec.split(":")
    t0 = time.time()
    r = score(prompts, generate_for(pipe, prompts, float(cfg), sampler=sampler, seed=int(seed)))["one"]
    print(spec, {k: round(v * 100, 1) for k, v in r.items()}, f"{time.time()-t0:.0f}s", flush=True)
