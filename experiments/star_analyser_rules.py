"""How much of the star LoRA's gap is the analyser's reading of small stars?

    python experiments/star_analyser_rules.py            # ~9 min on 2 cores; figures in runs/experiments/

`minisd eval`'s analyser tells a star from a triangle by convexity (area / convex hull ≤ 0.72: a
perfect star's is 0.5, a triangle's 0.95). Those two values are for perfect renders. Everything a model
draws has been through the VAE's decoder, and a decoded 14-px star keeps its points but fills its notches
a little. This script reads the same pictures under four rules and prints, for each, how many of them
read right:

* shipped — the analyser as it is: fill > 0.89 square, > 0.64 circle, else convexity > 0.72 triangle;
* convexity t — the same with the convexity threshold that misreads fewest decoded ground-truth
  pictures (the sweep over 0.70-0.90 is printed first);
* outline, pointed — fill decides square and circle as before; between triangle and star, which outline
  (drawn at the object's soft centroid, with the object's soft area, ±½ px) overlaps the object's
  colour coverage more (soft IoU: Σ min / Σ max);
* outline, all four — the same overlap among all four outlines, no fill thresholds.

Pictures: decoded ground truth (`render_prompt`, every shape in every colour × size × position, five
draws each: the VAE's ceiling), the base model's 180 one-object evaluation prompts (two noise draws),
the 60 star prompts without the LoRA (one draw) and with it (three), and the LoRA's 60 base-shape
prompts (two). The figures show the LoRA's small stars on which the two outline rules disagree, and the
decoded small stars that the shipped rule reads as triangles.
"""

import os
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw

from minisd import StableDiffusion
from minisd.eval import analyse, concept_prompts, eval_prompts, explain, generate_for, parse, render_prompt
from minisd.shapes import COLOURS, SHAPES, SUPERSAMPLE, shape_polygon, to_tensor

OUT = "runs/experiments/star_analyser_rules"


def coverage(shape: str, cx: float, cy: float, s: float, size: int = 64) -> np.ndarray:
    """The soft coverage (0..1 per pixel) of `shape` in an s×s box centred at (cx, cy), drawn like the world."""
    big = Image.new("L", (size * SUPERSAMPLE,) * 2, 0)
    poly = shape_polygon(shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, s * SUPERSAMPLE)
    if poly is None:
        ImageDraw.Draw(big).ellipse([(cx - s / 2) * SUPERSAMPLE, (cy - s / 2) * SUPERSAMPLE,
                                     (cx + s / 2) * SUPERSAMPLE, (cy + s / 2) * SUPERSAMPLE], fill=255)
    else:
        ImageDraw.Draw(big).polygon(poly, fill=255)
    return np.asarray(big.resize((size, size), Image.BOX), dtype=np.float32) / 255


def centroid(m: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[:m.shape[0], :m.shape[1]]
    return float((m * xs).sum() / m.sum()) + 0.5, float((m * ys).sum() / m.sum()) + 0.5


# each outline's area as a share of its box, and its centroid's offset from the box centre (per unit side)
UNIT = {shape: (coverage(shape, 32, 32, 40).sum() / 1600, *((c - 32) / 40 for c in centroid(coverage(shape, 32, 32, 40))))
        for shape in SHAPES}


def outline_read(image, obj, shapes) -> str:
    """Which outline, matched to the object's soft area and centroid, overlaps its colour coverage most."""
    _, best, alpha, _ = explain(image)
    x0, y0, x1, y1 = obj.bbox
    near = np.zeros_like(obj.mask)
    near[max(y0 - 3, 0):y1 + 4, max(x0 - 3, 0):x1 + 4] = True
    soft = np.where(near & (best == list(COLOURS).index(obj.colour)), np.clip(alpha, 0, 1), 0)
    cx, cy = centroid(soft)

    def overlap(shape):
        share, ox, oy = UNIT[shape]
        s = np.sqrt(soft.sum() / share)
        return max(np.minimum(t, soft).sum() / np.maximum(t, soft).sum()
                   for dx in (-0.5, 0, 0.5) for dy in (-0.5, 0, 0.5)
                   for t in [coverage(shape, cx - ox * s + dx, cy - oy * s + dy, s)])
    return max(shapes, key=overlap)


def by_threshold(t):
    return lambda image, o: "square" if o.fill > 0.89 else "circle" if o.fill > 0.64 else \
        "triangle" if o.solidity > t else "star"




def reads(prompts, images, rule):
    """(asked shape, asked size, read shape) per one-object prompt; the asked colour's object, else the largest."""
    out = []
    for prompt, image in zip(prompts, images):
        want = parse(prompt)[0][0]
        a = analyse(image)
        o = a.find(want.colour) or (a.objects[0] if a.objects else None)
        out.append((want.shape, want.size, rule(image, o) if o else None))
    return out


def share(rs, size=None, shape=None):
    rs = [r for r in rs if (size is None or r[1] == size) and (shape is None or r[0] == shape)]
    return 100 * sum(r[0] == r[2] for r in rs) / len(rs)


def grid(images, path):
    g = Image.new("RGB", (64 * 10, 64 * max(1, (len(images) + 9) // 10)))
    for i, im in enumerate(images):
        g.paste(Image.fromarray(np.asarray(im)), (64 * (i % 10), 64 * (i // 10)))
    g.resize((g.width * 3, g.height * 3), Image.NEAREST).save(path)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    pipe = StableDiffusion.from_pretrained("tiny")
    pipe.progress = False
    sets = {}
    truth = [(p, render_prompt(p, seed=50_000 + i)) for i, p in enumerate(
        [p for shape in SHAPES for p in concept_prompts(shape)] * 5)]
    x = torch.stack([to_tensor(im) for _, im in truth])
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(x).mode()).float()
    sets["decoded ground truth"] = ([p for p, _ in truth],
                                    ((rec / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())

    def draw(name, prompts, seeds):
        sets[name] = (prompts * len(seeds), [np.asarray(im) for s in seeds for im in generate_for(pipe, prompts, seed=s)])
        print(f"{name}: {len(sets[name][1])} pictures", flush=True)

    one = [p for p in eval_prompts() if " and " not in p]
    draw("base model, one object", one, [0, 1000])
    draw("star, no LoRA", concept_prompts("star"), [0])
    pipe.load_lora("data/tiny_star_lora")
    draw("star, LoRA", concept_prompts("star"), [0, 1000, 2000])
    draw("base shapes, LoRA", one[::3], [0, 1000])

    gt = sets["decoded ground truth"]
    misreads = {float(t): sum(s != r for s, _, r in reads(*gt, by_threshold(t)))
                for t in np.round(np.arange(0.70, 0.905, 0.02), 2)}
    print("decoded ground truth misread, by convexity threshold:", misreads)
    fewest = min(misreads, key=misreads.get)
    rules = {
        "shipped": lambda image, o: o.shape,
        f"convexity {fewest:g}": by_threshold(fewest),
        "outline, pointed": lambda image, o: o.shape if o.fill > 0.64 else outline_read(image, o, ("triangle", "star")),
        "outline, all four": lambda image, o: outline_read(image, o, SHAPES),
    }

    print("| rule | decoded small star / triangle / square / circle (ceiling) | base model shape | star, no LoRA "
          "| star, LoRA (small) | base shapes, LoRA |")
    print("|---|---|---|---|---|---|")
    small = {}
    for name, rule in rules.items():
        r = {k: reads(*v, rule) for k, v in sets.items()}
        small[name] = r["star, LoRA"]
        ceiling = " / ".join(f"{share(r['decoded ground truth'], 'small', s):.0f}"
                             for s in ("star", "triangle", "square", "circle"))
        print(f"| {name} | {ceiling} | {share(r['base model, one object']):.1f} | {share(r['star, no LoRA']):.1f} "
              f"| {share(r['star, LoRA']):.1f} ({share(r['star, LoRA'], 'small'):.1f}) "
              f"| {share(r['base shapes, LoRA']):.1f} |", flush=True)
        print("   LoRA small stars read as", dict(Counter(x[2] for x in r["star, LoRA"] if x[1] == "small")), flush=True)
        by_colour = {c: [x for x, p in zip(r["decoded ground truth"], gt[0]) if x[:2] == ("star", "small") and f" {c} " in p]
                     for c in COLOURS}
        print("   decoded small stars read right, by colour:",
              {c: f"{100 * sum(x[2] == 'star' for x in v) / len(v):.0f}%" for c, v in by_colour.items()}, flush=True)

    lora = sets["star, LoRA"][1]
    split = [im for im, a, b in zip(lora, small["outline, pointed"], small["outline, all four"])
             if a[1] == "small" and (a[2] == "star") != (b[2] == "star")]
    grid(split, f"{OUT}/lora_small_stars_rules_disagree.png")
    shipped = reads(*gt, rules["shipped"])
    grid([im for im, r in zip(gt[1], shipped) if r[0] == "star" and r[1] == "small" and r[2] != "star"][:40],
         f"{OUT}/decoded_small_stars_shipped_misreads.png")
    print(f"figures: {OUT}/ ({len(split)} LoRA small stars the outline rules disagree on)")
