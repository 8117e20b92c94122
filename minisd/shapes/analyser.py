"""Prompt adherence for the shapes world: does the picture show what the prompt asked for?

The analyser reads a 64×64 picture without the model that made it (the course's stand-in for a
CLIP score):

1. background: the median colour of the one-pixel border, snapped to the nearest background colour;
2. segmentation: each pixel is explained as a mix  p ≈ bg + α (c − bg)  of the background and each
   palette colour c (least squares in α); it belongs to the colour with the smallest residual if
   α > 0.5 — so anti-aliased edges (half red, half white) count as red, not as orange;
3. objects: connected pixels of one colour (the largest component per colour, at least `MIN_AREA`);
4. shape from how it fills its bounding box (circle π/4 ≈ 0.79, square 1, triangle 0.5, star ≈ 0.33)
   and its convexity (area / convex-hull area: the star's ≈ 0.5 tells it from the triangle's ≈ 0.95);
   position from the bounding-box centre (nearest of the five anchors); size from the longer side.

`score(prompts, images)` gives per-factor accuracy; `check_on_ground_truth()` shows the analyser
itself is right (≥ 99%) on rendered pictures before its numbers are trusted.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count, islice
from pathlib import Path

import numpy as np
from PIL import Image

from ..diffusion.samplers import default_sampler, get_sampler
from ..generate import DIFFUSERS_INPAINT
from ..pipeline import StableDiffusion
from .world import (
    BACKGROUNDS,
    BASE_SHAPES,
    COLOURS,
    PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    control_map,
    convex_hull,
    make_scene,
    render,
    to_tensor,
)

MIN_AREA = 20  # px; a small triangle covers ~98, a small star ~60


@dataclass
class Detected:
    colour: str
    shape: str
    position: str
    size: str
    area: int
    fill: float       # area / bounding-box area
    solidity: float   # area / convex-hull area
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)  # its pixels, (H, W) bool


@dataclass
class Analysis:
    background: str
    objects: list[Detected]

    def find(self, colour: str) -> Detected | None:
        return next((o for o in self.objects if o.colour == colour), None)


def _components(mask: np.ndarray) -> np.ndarray:
    """Connected-component labels (8-connectivity) of a boolean image, by min-label propagation."""
    H, W = mask.shape
    big = H * W + 1
    labels = np.where(mask, np.arange(H * W).reshape(H, W), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        neighbours = np.stack([p[1 + dy: 1 + dy + H, 1 + dx: 1 + dx + W]
                               for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        new = np.where(mask, neighbours.min(axis=0), big)
        if (new == labels).all():
            return np.where(mask, labels, -1)
        labels = new


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (the shoelace formula)."""
    hull = convex_hull(points)
    if len(hull) < 3:
        return 0.0
    x, y = np.array(hull, dtype=float).T
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def classify_shape(fill: float, solidity: float) -> str:
    if fill > 0.89:
        return "square"
    if fill > 0.64:
        return "circle"
    return "triangle" if solidity > 0.72 else "star"


def nearest(point: tuple[float, float], anchors: dict) -> str:
    return min(anchors, key=lambda k: (anchors[k][0] - point[0]) ** 2 + (anchors[k][1] - point[1]) ** 2)


def explain(image: Image.Image | np.ndarray) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-2: the background's name, and for each pixel the index (into COLOURS) of the palette
    colour that explains it best, that colour's α and the residual of the fit (each (H, W))."""
    px = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg_name = min(BACKGROUNDS, key=lambda b: np.linalg.norm(np.median(border, axis=0) - BACKGROUNDS[b]))
    bg = np.array(BACKGROUNDS[bg_name], dtype=np.float32)
    d = px - bg  # (H, W, 3)
    residuals, alphas = [], []
    for name in COLOURS:
        c = np.array(COLOURS[name], dtype=np.float32) - bg
        alpha = np.clip((d @ c) / (c @ c), 0, 1.2)
        residuals.append(np.linalg.norm(d - alpha[..., None] * c, axis=-1))
        alphas.append(alpha)
    residuals, alphas = np.stack(residuals), np.stack(alphas)  # (6, H, W)
    best = residuals.argmin(axis=0)
    return (bg_name, best, np.take_along_axis(alphas, best[None], 0)[0],
            np.take_along_axis(residuals, best[None], 0)[0])


def analyse(image: Image.Image | np.ndarray) -> Analysis:
    bg_name, best, alpha, residual = explain(image)
    foreground = (alpha > 0.5) & (residual < 80)
    names = list(COLOURS)
    objects = []
    for k, name in enumerate(names):
        mask = foreground & (best == k)
        if mask.sum() < MIN_AREA:
            continue
        labels = _components(mask)
        ids, counts = np.unique(labels[labels >= 0], return_counts=True)
        comp = labels == ids[counts.argmax()]
        area = int(comp.sum())
        if area < MIN_AREA:
            continue
        ys, xs = np.nonzero(comp)
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        w, h = x1 - x0 + 1, y1 - y0 + 1
        corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
        solidity = area / max(_hull_area(corners), 1.0)
        fill = area / (w * h)
        centre = ((x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2)
        objects.append(Detected(name, classify_shape(fill, solidity), nearest(centre, POSITIONS),
                                "large" if max(w, h) > (SIZES["small"] + SIZES["large"]) / 2 else "small",
                                area, fill, solidity, (int(x0), int(y0), int(x1), int(y1)), comp))
    objects.sort(key=lambda o: -o.area)
    return Analysis(bg_name, objects)


# ─── prompts ───────────────────────────────────────────────────────────────────────────────────────

_OBJECT = re.compile(r"an? (?:(small|large) )?(\w+) (\w+)(?: (on the left|on the right|at the top|at the bottom|in the center))?")
_WHERE = {v: k for k, v in PHRASES.items()}


@dataclass
class Wanted:
    colour: str
    shape: str
    size: str | None
    position: str | None


def parse(prompt: str) -> tuple[list[Wanted], str | None]:
    """'a large red circle on the left and a blue square on the right on a black background' ->
    ([Wanted(red, circle, large, left), Wanted(blue, square, None, right)], 'black')."""
    background = None
    m = re.search(r" on a (\w+) background$", prompt)
    if m:
        background, prompt = m.group(1), prompt[: m.start()]
    wanted = []
    for part in prompt.split(" and "):
        m = _OBJECT.fullmatch(part.strip())
        if not m or m.group(2) not in COLOURS or m.group(3) not in SHAPES:
            raise ValueError(f"not in the shapes-world grammar: {part!r}")
        wanted.append(Wanted(m.group(2), m.group(3), m.group(1), _WHERE.get(m.group(4))))
    return wanted, background


def eval_prompts() -> list[str]:
    """The fixed evaluation list: every colour × base shape × size × position once (180 one-object
    prompts, background named in a third of them), and 60 two-object prompts (left and right)."""
    prompts = []
    bgs = list(BACKGROUNDS)
    i = 0
    for colour in COLOURS:
        for shape in BASE_SHAPES:
            for size in SIZES:
                for position in POSITIONS:
                    p = f"a {size} {colour} {shape} {PHRASES[position]}"
                    if i % 3 == 0:
                        p += f" on a {bgs[(i // 3) % 3]} background"
                    prompts.append(p)
                    i += 1
    rng = np.random.default_rng(1234)
    colours = list(COLOURS)
    for _ in range(60):
        c1, c2 = rng.choice(colours, 2, replace=False)
        s1, s2 = rng.choice(list(BASE_SHAPES), 2)
        prompts.append(f"a {c1} {s1} on the left and a {c2} {s2} on the right")
    return prompts


def concept_prompts(shape: str = "star") -> list[str]:
    """One-object prompts for one shape: every colour × size × position (60) — a LoRA's new concept."""
    return [f"a {size} {colour} {shape} {PHRASES[position]}" for colour in COLOURS for size in SIZES
            for position in POSITIONS]


def layout_scenes(n: int = 60, seed: int = 7_000_000) -> list[Scene]:
    """Held-out layouts for ControlNet: scenes from seeds no training run uses."""

    return [make_scene(seed + i) for i in range(n)]


def layout_prompt(scene: Scene) -> str:
    """What is in the scene but not where: "a red circle and a blue square" — the map must say where."""
    return " and ".join(f"a {o.colour} {o.shape}" for o in scene.objects)


def foreground(image) -> np.ndarray:
    """Pixels that are not background (the background read from the border, as `analyse` does)."""
    px = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    return np.linalg.norm(px - np.median(border, axis=0), axis=-1) > 60


def layout_iou(image, scene: Scene) -> float:
    """Intersection over union of the picture's foreground and the scene's object mask."""

    want = np.asarray(control_map(scene, "mask").convert("L")) > 127
    got = foreground(image)
    return float((want & got).sum() / max((want | got).sum(), 1))


# ─── scoring ───────────────────────────────────────────────────────────────────────────────────────

FACTORS = ("colour", "shape", "position", "size", "background")


def judge(prompt: str, image) -> dict[str, bool]:
    """Which requested factors the picture gets right. One object: colour, shape, position, size
    (and background), each on its own: shape/position/size are read from the object of the requested
    colour, or from the largest object when that colour is missing. Two objects: `both` = each
    object found in its colour with the right shape and position."""
    wanted, background = parse(prompt)
    a = analyse(image)
    out: dict[str, bool] = {}
    if background is not None:
        out["background"] = a.background == background
    if len(wanted) == 1:
        w = wanted[0]
        found = a.find(w.colour)
        out["colour"] = found is not None
        obj = found or (a.objects[0] if a.objects else None)
        out["shape"] = obj is not None and obj.shape == w.shape
        if w.position is not None:
            out["position"] = obj is not None and obj.position == w.position
        if w.size is not None:
            out["size"] = obj is not None and obj.size == w.size
        return out
    ok = []
    for w in wanted:
        obj = a.find(w.colour)
        ok.append(obj is not None and obj.shape == w.shape and (w.position is None or obj.position == w.position))
    out["both"] = all(ok)
    out["colours"] = all(a.find(w.colour) is not None for w in wanted)
    return out


def score(prompts: list[str], images: list) -> dict[str, dict[str, float]]:
    """Per-factor accuracy, separately for one-object and two-object prompts: {"one": {...}, "two": {...}}."""
    tallies: dict[str, dict[str, list[bool]]] = {"one": {}, "two": {}}
    for prompt, image in zip(prompts, images):
        group = "two" if " and " in prompt else "one"
        for factor, ok in judge(prompt, image).items():
            tallies[group].setdefault(factor, []).append(ok)
    return {g: {f: float(np.mean(v)) for f, v in t.items()} for g, t in tallies.items() if t}


def render_prompt(prompt: str, seed: int = 0) -> Image.Image:
    """The ground truth: draw what the prompt says (unnamed attributes picked at random)."""
    rng = np.random.default_rng(seed)
    wanted, background = parse(prompt)
    objs = []
    for w in wanted:
        position = w.position or str(rng.choice([p for p in POSITIONS if p not in [o.position for o in objs]]))
        x, y = POSITIONS[position]
        size = w.size or str(rng.choice(list(SIZES)))
        lo, hi = SIZES[size] / 2 + 1, 64 - SIZES[size] / 2 - 1
        jitter = rng.uniform(-3, 3, 2)
        objs.append(ShapeObject(w.colour, w.shape, size, position,
                                (float(np.clip(x + jitter[0], lo, hi)), float(np.clip(y + jitter[1], lo, hi)))))
    return render(Scene(background or str(rng.choice(list(BACKGROUNDS))), objs))


def check_on_ground_truth(prompts: list[str] | None = None) -> dict[str, dict[str, float]]:
    """The analyser's accuracy on rendered pictures of the prompts themselves (should be ≥ 99%)."""
    prompts = prompts or eval_prompts()
    return score(prompts, [render_prompt(p, seed=i) for i, p in enumerate(prompts)])


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per setting (e.g. "CFG 7.5"), one column per factor."""
    cols = [("one", f) for f in ("colour", "shape", "position", "size", "background")] + [("two", "both")]
    head = "| setting | " + " | ".join(f"{f}" if g == "one" else "two objects: both" for g, f in cols) + " |"
    rows = [head, "|" + "---|" * (len(cols) + 1)]
    for name, res in results.items():
        cells = [f"{100 * res.get(g, {}).get(f, float('nan')):.0f}%" for g, f in cols]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ─── evaluating a model ────────────────────────────────────────────────────────────────────────────

def generate_for(pipe, prompts: list[str], guidance_scale: float = 7.5, steps: int = 25, sampler: str | None = None,
                 seed: int = 0, batch: int = 40, output_type: str = "pil") -> list:
    """One picture per prompt; prompt i starts from the noise of seed `seed + i`, whatever the batch size.
    A stochastic sampler's own draws (LCM's re-noising, the ancestral samplers') come from a generator seeded
    `seed + start` for the batch starting at prompt `start`, so that every picture is reproducible.
    sampler None: the model's own (`samplers.default_sampler`: DDIM, flow_euler for a flow model).
    output_type "latent": the final latents instead, one (4, h, w) tensor per prompt."""
    import torch

    c = pipe.backbone.config  # the U-Net's or the transformer's: latent channels and size
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        noise = torch.stack([torch.randn(c.in_channels if c.in_channels == 4 else 4, c.sample_size, c.sample_size,
                                         generator=torch.Generator().manual_seed(seed + start + i))
                             for i in range(len(chunk))])
        images += list(pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                            latents=noise, generator=torch.Generator().manual_seed(seed + start),
                            output_type=output_type))
    return images


def two_object_failure(prompt: str, image) -> str:
    """What went wrong with a two-object prompt, in one word-group (or "both right")."""
    wanted, _ = parse(prompt)
    a = analyse(image)
    found = [a.find(w.colour) for w in wanted]
    if any(f is None for f in found):
        return "a colour missing (both objects in one colour, or one object missing)"
    if all(f.shape == w.shape and f.position == w.position for f, w in zip(found, wanted)):
        return "both right"
    if all(f.position == w.position for f, w in zip(found, wanted)):
        return "a shape wrong"
    if found[0].position == wanted[1].position and found[1].position == wanted[0].position:
        return "colours on swapped sides"
    return "a position wrong"


def two_object_breakdown(pipe, guidance_scale: float = 7.5, steps: int = 25, seed: int = 0) -> dict[str, int]:
    """How the model fails the two-object prompts of the evaluation list: counts per kind of failure."""

    prompts = [p for p in eval_prompts() if " and " in p]
    images = generate_for(pipe, prompts, guidance_scale, steps, seed=seed)
    return dict(Counter(two_object_failure(p, im) for p, im in zip(prompts, images)).most_common())


def evaluate(pipe, prompts: list[str] | None = None, guidance_scale: float = 7.5, steps: int = 25,
             sampler: str | None = None, seed: int = 0, draws: int = 1) -> dict[str, dict[str, float]]:
    """Prompt adherence of `pipe` on the fixed prompt list (default) — per-factor accuracy.

    `draws` > 1 scores every prompt under that many noise draws (seeds `seed`, `seed` + 1000, ...):
    one draw's 180 one-object prompts measure a factor near 95% to about ±1.6 points (one standard
    error), as much as the differences one often wants to read off it."""
    prompts = prompts or eval_prompts()
    images = [im for d in range(draws) for im in generate_for(pipe, prompts, guidance_scale, steps, sampler,
                                                              seed + 1000 * d)]
    return score(prompts * draws, images)


def evaluate_lora(pipe, lora, concept: str = "star", scale: float = 1.0, steps: int = 25) -> dict:
    """Adherence on the concept's prompts and on the base one-object prompts, without and with the LoRA:
    the new shape should appear, the old ones should stay right."""
    base = [p for p in eval_prompts() if " and " not in p][::3]  # 60 one-object prompts
    concept_list = concept_prompts(concept)
    out = {}
    for label in ("without LoRA", f"with LoRA (scale {scale:g})"):
        if label.startswith("with "):
            name = pipe.load_lora(lora, scale=scale, name="eval")
        res_concept = score(concept_list, generate_for(pipe, concept_list, steps=steps))["one"]
        res_base = score(base, generate_for(pipe, base, steps=steps))["one"]
        out[label] = {f"{concept}: shape": res_concept["shape"], f"{concept}: colour": res_concept["colour"],
                      f"{concept}: position": res_concept["position"], "base shapes: shape": res_base["shape"],
                      "base shapes: colour": res_base["colour"]}
    pipe.unload_lora(name)
    return out


def evaluate_controlnet(pipe, controlnet, kind: str = "edges", n: int = 60, scale: float = 1.0,
                        steps: int = 25) -> dict:
    """Held-out layouts, prompts that name the objects but not where they are: how well the pictures
    cover the layout's objects (mean IoU; placed = IoU ≥ 0.5), without and with the ControlNet."""
    import torch


    scenes = layout_scenes(n)
    prompts = [layout_prompt(s) for s in scenes]
    noise = torch.stack([torch.randn(4, pipe.unet.config.sample_size, pipe.unet.config.sample_size,
                                     generator=torch.Generator().manual_seed(i)) for i in range(n)])
    maps = [control_map(s, kind) for s in scenes]
    out = {}
    pipe.load_controlnet(controlnet)
    try:
        for label, s in (("without ControlNet", 0.0), (f"with ControlNet (scale {scale:g})", scale)):
            images = []
            for i in range(0, n, 20):
                images += pipe(prompts[i:i + 20], latents=noise[i:i + 20], num_inference_steps=steps,
                               control_image=maps[i:i + 20], controlnet_scale=s)
            ious = np.array([layout_iou(im, sc) for im, sc in zip(images, scenes)])
            out[label] = {"mean IoU": float(ious.mean()), "placed (IoU >= 0.5)": float((ious >= 0.5).mean())}
    finally:
        pipe.unload_controlnet()
    return out


@dataclass
class InpaintTask:
    """Replace one object of a two-object picture by another (new colour and shape, same place)."""
    image: Image.Image
    mask: Image.Image   # white = repaint: the replaced object's box, grown by 4 px
    prompt: str         # both objects, the new one in place of the old, with their positions
    kept: int           # which object (0 or 1, reading order) must stay as it was


def two_object_scenes(seed: int) -> Iterator[Scene]:
    """The two-object scenes among make_scene(seed), make_scene(seed + 1), …, in order (endless)."""
    for i in count():
        scene = make_scene(seed + i, p_two=1.0)
        if len(scene.objects) == 2:
            yield scene


def replacement(scene: Scene, k: int, rng: np.random.Generator, size: tuple[int, int]) -> tuple[ShapeObject, Image.Image]:
    """Object k of a rendered two-object scene redrawn in a colour no object has and another shape, and the
    mask to inpaint it: its box grown by 4 px."""
    old = scene.objects[k]
    new = copy.copy(old)
    new.colour = str(rng.choice([c for c in COLOURS if c not in {o.colour for o in scene.objects}]))
    new.shape = str(rng.choice([sh for sh in BASE_SHAPES if sh != old.shape]))
    x0, y0, x1, y1 = old.bbox
    mask = Image.new("L", size, 0)
    mask.paste(255, (max(x0 - 4, 0), max(y0 - 4, 0), min(x1 + 4, size[0]), min(y1 + 4, size[1])))
    return new, mask


def inpaint_tasks(n: int = 60, seed: int = 9_000_000) -> list[InpaintTask]:
    """Held-out two-object scenes (seeds no training run uses), alternately replacing the first and second object."""
    rng = np.random.default_rng(seed)
    tasks = []
    for scene in islice(two_object_scenes(seed), n):
        image = render(scene)
        k = len(tasks) % 2
        new, mask = replacement(scene, k, rng, image.size)
        objects = [new if j == k else o for j, o in enumerate(scene.objects)]
        prompt = " and ".join(o.phrase(True, True) for o in objects)  # sizes too: the two never overlap
        tasks.append(InpaintTask(image, mask, prompt, 1 - k))
    return tasks


def evaluate_inpaint(pipes: dict, tasks: list[InpaintTask] | None = None, steps: int = 25,
                     guidance_scale: float = 7.5, settings: dict | None = None) -> dict[str, dict[str, float]]:
    """For each pipeline ({label: pipe}): how often the new object appears right (colour, shape,
    position), the other one is still right, and both. The same seed for every pipeline. `settings` go
    to `pipe.inpaint`; by default diffusers' (`generate.DIFFUSERS_INPAINT`: noise from strength 1,
    nothing pasted back), so what is kept is the model's doing, not the paste-back's."""
    settings = DIFFUSERS_INPAINT if settings is None else settings
    tasks = tasks if tasks is not None else inpaint_tasks()
    out = {}
    for label, pipe in pipes.items():
        new_ok, kept_ok = [], []
        for i, task in enumerate(tasks):
            image = pipe.inpaint(task.prompt, task.image, task.mask, num_inference_steps=steps,
                                 guidance_scale=guidance_scale, seed=i, **settings)[0]
            wanted, _ = parse(task.prompt)
            a = analyse(image)
            right = [(o := a.find(w.colour)) is not None and o.shape == w.shape and o.position == w.position
                     for w in wanted]
            new_ok.append(right[1 - task.kept])
            kept_ok.append(right[task.kept])
        out[label] = {"new object right": float(np.mean(new_ok)), "other object kept": float(np.mean(kept_ok)),
                      "both": float(np.mean([a and b for a, b in zip(new_ok, kept_ok)]))}
    return out


def evaluate_vae(pipe, shape_names=("circle", "square", "triangle", "star")) -> dict[str, dict[str, float]]:
    """A model's ceiling: it cannot draw what its VAE cannot reconstruct. Ground-truth renders of
    each shape in every colour × size × position (60 pictures a shape), encoded, decoded and judged;
    shape accuracy by size, and the mean |error| of the round trip in [0, 1]."""
    import torch


    out = {}
    for shape in shape_names:
        prompts = concept_prompts(shape)
        images = [render_prompt(p, seed=i) for i, p in enumerate(prompts)]
        x = torch.stack([to_tensor(im) for im in images]).to(pipe.device, pipe.vae.dtype)
        with torch.no_grad():
            rec = pipe.vae.decode(pipe.vae.encode(x).mode()).float().cpu()
        rec_u8 = ((rec / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        ok = {size: [judge(p, Image.fromarray(a))["shape"] for p, a in zip(prompts, rec_u8) if f" {size} " in p]
              for size in SIZES}
        out[shape] = {**{f"shape, {size}": float(np.mean(v)) for size, v in ok.items()},
                      "mean |error|": float((rec - x.float().cpu()).abs().mean() / 2)}
    return out


def _save_json(results: dict, path: str | None) -> dict:
    if path:
        import json

        with open(path, "w") as f:
            json.dump(results, f, indent=2)
    return results


def _report(results: dict, first: str, fmt, json_path: str | None) -> dict:
    """Print {row: {column: value}} as a markdown table (values through fmt(column, value)); save as JSON."""
    cols = list(next(iter(results.values())))
    print(f"| {first} | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for name, res in results.items():
        print(f"| {name} | " + " | ".join(fmt(c, res[c]) for c in cols) + " |")
    return _save_json(results, json_path)


def eval_parser():
    """The flags of `minisd eval`."""
    import argparse

    ap = argparse.ArgumentParser(prog="minisd eval", description="Prompt adherence on the shapes world: "
                                 "per-factor accuracy over the fixed prompt list (240 prompts).")
    ap.add_argument("--model", default="tiny", help="tiny (default), a folder or a file")
    ap.add_argument("--cfg", type=float, nargs="+", default=[7.5, 1.0], help="guidance scales to compare")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default=None, help="default: the model's own (ddim; flow_euler for a flow model, "
                    "lcm for an LCM)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=None, help="score each prompt under this many noise draws (seeds "
                    "seed, seed+1000, ...): less noise, proportionally slower (default 1; 3 for --embedding and "
                    "--dreambooth)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--limit", type=int, default=None, help="only every n-th prompt (quick look)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--ground-truth", action="store_true", help="score rendered pictures instead (checks the analyser)")
    ap.add_argument("--lora", default=None, help="evaluate this LoRA: its concept's prompts and the base shapes, "
                    "without and with it")
    ap.add_argument("--concept", default="star", help="the LoRA's new shape (default star)")
    ap.add_argument("--embedding", default=None, help="evaluate this textual inversion (a learned_embeds file or "
                    "folder, an A1111 .pt/.safetensors): the concept's prompts with its token and the base shapes, "
                    "beside the base model; --draws noise draws (default here 3)")
    ap.add_argument("--dreambooth", default=None, help="evaluate this fine-tuned model (a DreamBooth folder) beside "
                    "--model on the concept's prompts and the base shapes; --draws noise draws (default here 3)")
    ap.add_argument("--edit", action="store_true", help="prompt-to-prompt on 60 held-out one-object pictures "
                    "(seeds 8,000,000 + --seed + i), a colour swap and a shape swap each, --steps DDIM steps: the new "
                    "word right with shape (colour) and place kept; --limit n edits every n-th picture")
    ap.add_argument("--controlnet", default=None, help="evaluate this ControlNet: layout IoU without and with it")
    ap.add_argument("--control", default="edges", help="the ControlNet's map kind: edges or mask")
    ap.add_argument("--inpaint", default=None, help="compare mask blending (--model) with this 9-channel "
                    "inpainting model on 60 held-out object replacements (diffusers' settings: nothing pasted back)")
    ap.add_argument("--video", default=None, help="evaluate this motion module (a `minisd train motion` folder) on "
                    "held-out moving-shapes clips: the direction of motion, and colour and shape held across the frames; "
                    "--limit clips (default 32), the first --cfg")
    ap.add_argument("--breakdown", action="store_true", help="how the two-object prompts fail (at the first --cfg)")
    ap.add_argument("--vae", action="store_true", help="the VAE's ceiling: shape accuracy of ground-truth renders "
                    "after an encode-decode round trip")
    ap.add_argument("--fid", action="store_true", help="FID and KID (shapes-world features) of --fid-n pictures "
                    "against renders of the same prompts, beside the floor: renders against renders")
    ap.add_argument("--fid-n", type=int, default=1000, help="pictures for --fid (default 1000, at least 50): the "
                    "evaluation prompts cycled, prompt i from the noise of seed + i")
    return ap


def _fid_cell(column: str, value) -> str:
    if value is None:
        return "–"
    return str(value) if column == "N" else f"{value:.5f}" if column.startswith("KID") else f"{value:.3f}"


def main(argv: list[str] | None = None, fid=None, teaching=None, editing=None, video=None) -> dict:
    """`minisd eval`: prompt adherence of a model at one or more guidance scales.

    `fid`: what --fid runs, `scoreboard.fid_table`; `teaching`: what --embedding and --dreambooth run,
    `concept_eval.compare`; `editing`: what --edit runs, `edit_eval.edit_report`; `video`: what --video runs,
    `video_eval.report` (`minisd eval` passes them in: they judge pictures with this module, so this module cannot
    import them)."""
    import json
    import time

    args = eval_parser().parse_args(argv)
    check_eval_args(args)
    if args.fid and fid is None:
        raise ValueError("--fid needs the shapes-world features: run it as `minisd eval --fid`")
    if (args.embedding or args.dreambooth) and teaching is None:
        raise ValueError("--embedding and --dreambooth need concept_eval: run them as `minisd eval`")
    if args.edit and editing is None:
        raise ValueError("--edit needs edit_eval: run it as `minisd eval --edit`")
    if args.video:
        if video is None:
            raise ValueError("--video needs video_eval: run it as `minisd eval --video`")
        return _save_json(video(args.video, args.limit or 32, args.model, args.steps, args.cfg[0], args.seed), args.json)
    if args.inpaint:
        pipes = {"blending (standard U-Net)": StableDiffusion.from_pretrained(args.model, device=args.device),
                 "9-channel inpainting U-Net": StableDiffusion.from_pretrained(args.inpaint, device=args.device)}
        for p in pipes.values():
            p.progress = False
        return _report(evaluate_inpaint(pipes, steps=args.steps), "method", lambda c, v: f"{100 * v:.0f}%", args.json)
    pipe = None
    if not args.ground_truth:
        pipe = StableDiffusion.from_pretrained(args.model, device=args.device)
        pipe.progress = False
    if args.fid:
        sampler = args.sampler or default_sampler(pipe.scheduler.prediction_type)
        print(f"FID and KID on {args.fid_n} pictures: {args.model}, {sampler}, {args.steps} steps", flush=True)
        return _report(fid(pipe, args.fid_n, args.cfg, args.steps, sampler, args.seed), "pictures", _fid_cell,
                       args.json)
    if args.breakdown:
        results = two_object_breakdown(pipe, args.cfg[0], args.steps, args.seed)
        print(f"two-object prompts at CFG {args.cfg[0]:g}, {args.steps} steps:")
        for kind, count in results.items():
            print(f"  {count:3d}  {kind}")
        return _save_json(results, args.json)
    if args.vae:
        return _report(evaluate_vae(pipe), "shape", lambda c, v: f"{v:.3f}" if "error" in c else f"{100 * v:.0f}%",
                       args.json)
    if args.embedding or args.dreambooth:
        results = teaching(pipe, args.embedding, args.dreambooth, args.concept, args.draws or 3, args.steps, args.seed,
                           args.device)
        return _report(results, "model", lambda c, v: f"{100 * v:.0f}%", args.json)
    if args.edit:
        return _report(editing(pipe, args.steps, args.seed, args.limit), "swap", lambda c, v: f"{100 * v:.0f}%",
                       args.json)
    if args.lora or args.controlnet:
        results = evaluate_lora(pipe, args.lora, args.concept, steps=args.steps) if args.lora else \
            evaluate_controlnet(pipe, args.controlnet, args.control, steps=args.steps)
        return _report(results, "setting", lambda c, v: f"{100 * v:.0f}%" if "IoU" not in c or "placed" in c
                       else f"{v:.2f}", args.json)
    prompts = eval_prompts()[:: args.limit or 1]
    if args.ground_truth:
        results = {"ground truth renders": check_on_ground_truth(prompts)}
    else:
        results = {}
        for scale in args.cfg:
            t0 = time.time()
            results[f"CFG {scale:g}"] = evaluate(pipe, prompts, scale, args.steps, args.sampler, args.seed, args.draws or 1)
            print(f"CFG {scale:g}: {len(prompts)} prompts × {args.draws or 1} draw(s) in {time.time() - t0:.0f}s",
                  flush=True)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def check_eval_args(args) -> None:
    """Refuse careless `minisd eval` flags before anything is loaded, each with one line."""
    import math

    import torch

    if args.sampler is not None:
        get_sampler(args.sampler)
    if args.fid_n < 50:  # fewer pictures than features (59) make the covariance of FID's Gaussians singular
        raise ValueError(f"--fid-n must be at least 50, got {args.fid_n}")
    for flag, value in (("--steps", args.steps), ("--draws", args.draws), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    bad = [c for c in args.cfg if not math.isfinite(c) or c < 0]
    if bad:
        raise ValueError(f"--cfg takes guidance scales of at least 0, got {bad[0]}")
    draws = args.draws or (3 if args.embedding or args.dreambooth else 1)  # each mode's default
    if not 0 <= args.seed <= 2**63 - 1 - 1000 * draws:  # draw k uses seed + 1000·k
        raise ValueError(f"--seed must be from 0 to {2**63 - 1 - 1000 * draws} here, got {args.seed}")
    if args.concept not in SHAPES:
        raise ValueError(f"--concept must be one of {', '.join(SHAPES)}, got {args.concept!r}")
    if args.control not in ("edges", "mask"):
        raise ValueError(f"--control must be edges or mask, got {args.control!r}")
    modes = [flag for flag, on in (("--inpaint", args.inpaint), ("--breakdown", args.breakdown), ("--vae", args.vae),
                                   ("--lora", args.lora), ("--controlnet", args.controlnet),
                                   ("--embedding/--dreambooth", args.embedding or args.dreambooth),
                                   ("--edit", args.edit), ("--ground-truth", args.ground_truth),
                                   ("--fid", args.fid), ("--video", args.video)) if on]
    if len(modes) > 1:
        raise ValueError(f"{' and '.join(modes)} are separate evaluations: give one at a time")
    for flag, path in (("--lora", args.lora), ("--controlnet", args.controlnet), ("--embedding", args.embedding),
                       ("--dreambooth", args.dreambooth), ("--video", args.video)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag} not found: {path}")
    if args.json is not None and (Path(args.json).is_dir() or not Path(args.json).absolute().parent.is_dir()):
        raise ValueError(f"--json {args.json}: expected a file name in an existing folder")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"--device must be cpu, cuda, cuda:N or mps, got {args.device!r}")


if __name__ == "__main__":
    main()
