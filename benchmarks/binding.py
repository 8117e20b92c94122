"""How each shapes-world model fails two objects: colour binding against shape, U-Net against MMDiT.

    python benchmarks/binding.py            # -> docs/results/binding.json

For the 60 two-object evaluation prompts under two noise draws (seeds 0 and 1000), at 25 steps of each
model's own sampler and CFG 7.5, `analyser.two_object_failure` names what went wrong with each picture:
both right, a shape wrong (colours in their places), colours on swapped sides, a colour missing (both objects
in one colour, or one missing), a position wrong. The first two say how well a model *binds* colours to
objects; the shape failures say how well it draws. Notebook 18 reads the JSON and checks what it says.
"""

from __future__ import annotations

import json
from collections import Counter

import torch

from minisd import StableDiffusion
from minisd.formats.files import atomic_write_text
from minisd.pipeline import DATA
from minisd.shapes.analyser import eval_prompts, generate_for, two_object_failure

MODELS = ("tiny", "tiny_flow", "tiny_mmdit")
SEEDS = (0, 1000)
OUT = DATA.parent / "docs" / "results" / "binding.json"


def main() -> dict:
    prompts = [p for p in eval_prompts() if " and " in p]
    result = {"prompts": len(prompts), "seeds": list(SEEDS), "steps": 25, "guidance_scale": 7.5,
              "threads": torch.get_num_threads(), "models": {}}
    for name in MODELS:
        pipe = StableDiffusion.from_pretrained(DATA / name, device="cpu")
        pipe.progress = False
        counts = Counter()
        for seed in SEEDS:
            images = generate_for(pipe, prompts, 7.5, 25, seed=seed)
            counts.update(two_object_failure(p, im) for p, im in zip(prompts, images))
        result["models"][name] = dict(counts.most_common())
        print(name, dict(counts.most_common()), flush=True)
    atomic_write_text(OUT, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
