"""Star LoRA trials: star-shape accuracy split by size, and what the misses are read as.

    python experiments/lora_by_size.py MODEL LORA [SCALE] [CFG]
    SEEDS=0,1000,2000 python experiments/lora_by_size.py ...     # three noise draws, 180 pictures
    BASE=1 ...                                                     # and the base shapes, with the LoRA

The 60 star prompts of `minisd eval --lora` (every colour × size × position, seeds 0-59, 25 DDIM steps).
Printed: counts of (asked size, shape the analyser read), then the star-shape share. Used for the
trials in experiments/star_lora_trials.md. One draw counts 30 small stars: at a third of them right, one
standard error is ±2.6 stars (±4 points of star shape); three draws shrink it to ±1.5 per 30.
With BASE=1 also the 60 one-object base-shape prompts of `minisd eval --lora` on the same draws, with the LoRA:
(asked shape, shape read) counts and the share right — does the LoRA leak into circles, squares, triangles.
"""

import os
import sys
from collections import Counter

from minisd.eval import analyse, parse


def shapes_by_size(prompts: list[str], images) -> Counter:
    """(asked size, shape the analyser read for the asked colour's object, or the largest; None: nothing) -> count."""
    read = Counter()
    for prompt, image in zip(prompts, images):
        want = parse(prompt)[0][0]
        a = analyse(image)
        obj = a.find(want.colour) or (a.objects[0] if a.objects else None)
        read[(want.size, obj.shape if obj else None)] += 1
    return read


def star_share(read: Counter) -> float:
    return sum(v for (_, shape), v in read.items() if shape == "star") / sum(read.values())


if __name__ == "__main__":
    from minisd import StableDiffusion
    from minisd.eval import concept_prompts, eval_prompts, generate_for

    pipe = StableDiffusion.from_pretrained(sys.argv[1])
    pipe.progress = False
    pipe.load_lora(sys.argv[2], scale=float(sys.argv[3]) if len(sys.argv) > 3 else 1.0)
    prompts = concept_prompts("star")
    seeds = [int(s) for s in os.environ.get("SEEDS", "0").split(",")]
    images = [im for s in seeds for im in generate_for(pipe, prompts, float(sys.argv[4]) if len(sys.argv) > 4 else 7.5,
                                                       seed=s)]
    read = shapes_by_size(prompts * len(seeds), images)
    print(sorted(read.items(), key=str))
    print("star shape", round(star_share(read), 3))
    if os.environ.get("BASE"):
        base = [p for p in eval_prompts() if " and " not in p][::3]  # evaluate_lora's 60
        read = Counter()
        for s in seeds:
            for prompt, image in zip(base, generate_for(pipe, base, seed=s)):
                want = parse(prompt)[0][0]
                a = analyse(image)
                obj = a.find(want.colour) or (a.objects[0] if a.objects else None)  # as eval.judge reads it
                read[(want.shape, obj.shape if obj else None)] += 1
        print(sorted(read.items(), key=str))
        print("base shapes right", round(sum(v for (a, b), v in read.items() if a == b) / sum(read.values()), 3))
