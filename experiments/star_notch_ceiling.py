"""Would small stars survive the VAE better with deeper notches (a smaller inner radius)?

    python experiments/star_notch_ceiling.py [RATIOS]      # default 0.382,0.33,0.30,0.25

The shapes world's star is a regular pentagram: inner radius 0.382 of the outer. A decoded 14-px star
fills its notches a little, and the analyser then reads a third of them as triangles or circles (session 11).
For each inner-radius ratio: the 30 small-star prompts of `minisd eval --lora`, five renders each (150
pictures), read by the analyser as drawn and after the VAE round trip (the posterior's mean, decoded);
lora_by_size.py's counting. Session 13, before trial lora34 (experiments/star_lora_trials.md).
"""

import math
import sys

import torch

from lora_by_size import shapes_by_size, star_share
from minisd import StableDiffusion, shapes
from minisd.eval import concept_prompts, render_prompt
from minisd.shapes import to_tensor

_polygon = shapes.shape_polygon


def with_inner_ratio(ratio: float):
    """A shape_polygon whose stars have inner radius `ratio` of the outer; other shapes unchanged."""
    def polygon(shape, cx, cy, s):
        if shape != "star":
            return _polygon(shape, cx, cy, s)
        h = s / 2
        return [(cx + (h if k % 2 == 0 else h * ratio) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (h if k % 2 == 0 else h * ratio) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    return polygon


if __name__ == "__main__":
    ratios = [float(r) for r in (sys.argv[1] if len(sys.argv) > 1 else "0.382,0.33,0.30,0.25").split(",")]
    pipe = StableDiffusion.from_pretrained("tiny", dtype=torch.float32)
    prompts = [p for p in concept_prompts("star") if " small " in p] * 5
    for ratio in ratios:
        shapes.shape_polygon = with_inner_ratio(ratio)
        drawn = [render_prompt(p, seed=50_000 + i) for i, p in enumerate(prompts)]
        with torch.no_grad():
            rec = pipe.vae.decode(pipe.vae.encode(torch.stack([to_tensor(im) for im in drawn])).mode())
        decoded = ((rec / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        print(f"inner radius {ratio:.3f}: read as stars drawn {star_share(shapes_by_size(prompts, drawn)):.3f}, "
              f"decoded {star_share(shapes_by_size(prompts, decoded)):.3f}")
    shapes.shape_polygon = _polygon
