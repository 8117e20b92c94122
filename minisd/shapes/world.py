"""The shapes world: 64×64 pictures of flat coloured shapes, and the captions that describe them.

Small enough to train a whole Stable Diffusion on two CPU cores, rich enough to show what a
text-to-image model does: colour, shape, position, size, two-object composition, new concepts
(`star`, held out of base training and taught by LoRA) and spatial control (ControlNet maps).
The palette, vocabulary and grammar are fixed, because evaluators rely on them:

    a [small|large] <colour> <shape> [<position phrase>] [on a <background> background]
    ... and a [small|large] <colour> <shape> <position phrase>

Everything is deterministic per seed: `make_scene(seed)` always draws the same picture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64          # image side, px
SUPERSAMPLE = 4    # draw at 4× and box-filter down: anti-aliased edges

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "purple": (150, 60, 200), "orange": (245, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "star")
BASE_SHAPES = ("circle", "square", "triangle")  # `star` is never in the base training data
SIZES = {"small": 14, "large": 28}              # side of the box the shape fills, px
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "center": "in the center"}
JITTER = 3  # px, uniform, on each axis of the centre

# Every word a caption (or a later lesson) uses: the tokenizer's vocabulary.
VOCABULARY = sorted(set(
    "a an and on the at in of with background picture photo image small large big tiny left right top bottom "
    "center middle no not without two shapes shape".split()
    + list(COLOURS) + list(BACKGROUNDS) + list(SHAPES) + ["dog", "cat", "sks"]))


@dataclass
class ShapeObject:
    colour: str
    shape: str
    size: str
    position: str
    center: tuple[float, float]        # (x, y) px
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # (x0, y0, x1, y1) px of the drawn pixels, filled by render

    def phrase(self, with_size: bool, with_position: bool) -> str:
        size = f"{self.size} " if with_size else ""
        article = "an" if not with_size and self.colour == "orange" else "a"
        where = f" {PHRASES[self.position]}" if with_position else ""
        return f"{article} {size}{self.colour} {self.shape}{where}"


@dataclass
class Scene:
    background: str
    objects: list[ShapeObject]
    caption: str = ""
    mentions: dict = field(default_factory=dict)  # which optional attributes the caption names


def shape_polygon(shape: str, cx: float, cy: float, s: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape filling an s×s box centred at (cx, cy); None for the circle."""
    h = s / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # apex up, base at the bottom of the box: fills half the box
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":  # five points, inner radius 0.382 of the outer (a regular pentagram)
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else h * 0.382
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return pts
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(scene: Scene) -> Image.Image:
    """Draw the scene at 4× and downsample (box filter): flat fills, anti-aliased edges."""
    S = SIZE * SUPERSAMPLE
    img = Image.new("RGB", (S, S), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy = (c * SUPERSAMPLE for c in obj.center)
        s = SIZES[obj.size] * SUPERSAMPLE
        poly = shape_polygon(obj.shape, cx, cy, s)
        if poly is None:
            draw.ellipse([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], fill=COLOURS[obj.colour])
        else:
            draw.polygon(poly, fill=COLOURS[obj.colour])
        xs, ys = ((p[0] for p in poly), (p[1] for p in poly)) if poly else ((cx - s / 2, cx + s / 2), (cy - s / 2, cy + s / 2))
        xs, ys = list(xs), list(ys)
        obj.bbox = (int(min(xs) // SUPERSAMPLE), int(min(ys) // SUPERSAMPLE),
                    int(math.ceil(max(xs) / SUPERSAMPLE)), int(math.ceil(max(ys) / SUPERSAMPLE)))
    return img.resize((SIZE, SIZE), Image.BOX)


def convex_hull(points) -> list[tuple[float, float]]:
    """Vertices of the convex hull of 2-D points, counter-clockwise (Andrew's monotone chain)."""
    pts = sorted(set(map(tuple, points)))
    if len(pts) < 3:
        return pts

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - \
                    (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0]) <= 0:
                out.pop()
            out.append(p)
        return out
    return half(pts)[:-1] + half(pts[::-1])[:-1]


def notches(scene: Scene, side: int = SIZE) -> np.ndarray:
    """(side, side): the share of each cell that lies inside an object's convex hull but outside the
    object — a star's five notches; nothing for the convex base shapes. Drawn at 4× like `render`.
    The star LoRA's loss weights these cells (finetune.py): they are what a small star loses first."""
    S = SIZE * SUPERSAMPLE
    img = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy = (c * SUPERSAMPLE for c in obj.center)
        poly = shape_polygon(obj.shape, cx, cy, SIZES[obj.size] * SUPERSAMPLE)
        if poly is not None:
            draw.polygon(convex_hull(poly), fill=255)
            draw.polygon(poly, fill=0)
    return np.asarray(img.resize((side, side), Image.BOX), dtype=np.float32) / 255


def _overlap(a: ShapeObject, b: ShapeObject, margin: float = 2.0) -> bool:
    ha, hb = SIZES[a.size] / 2, SIZES[b.size] / 2
    return (abs(a.center[0] - b.center[0]) < ha + hb + margin) and (abs(a.center[1] - b.center[1]) < ha + hb + margin)


def random_object(rng: np.random.Generator, shapes=BASE_SHAPES, position: str | None = None) -> ShapeObject:
    position = position or str(rng.choice(list(POSITIONS)))
    x, y = POSITIONS[position]
    colour, shape, size = str(rng.choice(list(COLOURS))), str(rng.choice(list(shapes))), str(rng.choice(list(SIZES)))
    lo, hi = SIZES[size] / 2 + 1, SIZE - SIZES[size] / 2 - 1  # keep the whole shape inside the frame
    center = (float(np.clip(x + rng.uniform(-JITTER, JITTER), lo, hi)),
              float(np.clip(y + rng.uniform(-JITTER, JITTER), lo, hi)))
    return ShapeObject(colour=colour, shape=shape, size=size, position=position, center=center)


def make_caption(scene: Scene, rng: np.random.Generator, positions: bool = True) -> str:
    """A caption in the core grammar; optional attributes are named with some probability, so the
    model learns both "a red circle" and "a large red circle on the left on a black background".
    `positions=False` never says where things are (ControlNet training: the map has to)."""
    objs = scene.objects
    if len(objs) == 1:
        with_size, with_position = rng.random() < 0.7, rng.random() < 0.8 and positions
        text = objs[0].phrase(with_size, with_position)
        mentions = {"size": with_size, "position": with_position}
    else:  # two objects: both positions are always named, so the caption says which is which
        with_size = rng.random() < 0.5
        text = " and ".join(o.phrase(with_size, positions) for o in objs)
        mentions = {"size": with_size, "position": positions}
    with_background = rng.random() < 0.5
    if with_background:
        text += f" on a {scene.background} background"
    scene.mentions = {**mentions, "background": with_background}
    return text


def make_scene(seed: int, shapes=BASE_SHAPES, p_two: float = 0.5) -> Scene:
    """One random scene with its caption; the same seed always gives the same scene."""
    rng = np.random.default_rng(seed)
    scene = Scene(background=str(rng.choice(list(BACKGROUNDS))), objects=[random_object(rng, shapes)])
    if rng.random() < p_two:
        first = scene.objects[0]
        if rng.random() < 0.5:  # half of the pairs side by side, the layout two-object prompts ask for most
            first = random_object(rng, shapes, str(rng.choice(["left", "right"])))
            scene.objects = [first]
        for _ in range(20):  # a second object at another position, not touching the first
            options = ["right" if first.position == "left" else "left"] if first.position in ("left", "right") \
                and rng.random() < 0.5 else [p for p in POSITIONS if p != first.position]
            other = random_object(rng, shapes, str(rng.choice(options)))
            if not _overlap(first, other):
                # left-to-right / top-to-bottom reading order, as the captions name them
                scene.objects = sorted([first, other], key=lambda o: (o.center[0], o.center[1]))
                break
    scene.caption = make_caption(scene, rng)
    return scene


def to_tensor(img: Image.Image):
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], the VAE's input range."""
    import torch

    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def dataset(n: int, seed: int = 0, shapes=BASE_SHAPES, p_two: float = 0.5):
    """n scenes (seeds seed·10⁷ + i): (images (n, 3, 64, 64) in [-1, 1], captions, scenes)."""
    import torch

    scenes = [make_scene(seed * 10_000_000 + i, shapes, p_two) for i in range(n)]
    images = torch.stack([to_tensor(render(s)) for s in scenes])
    return images, [s.caption for s in scenes], scenes


def control_map(scene: Scene, kind: str = "edges") -> Image.Image:
    """A ControlNet conditioning image: "mask" (white objects on black) or "edges" (their outlines)."""
    if kind not in ("edges", "mask"):
        raise ValueError(f"kind must be 'edges' or 'mask', got {kind!r}")
    silhouette = Scene(background="black", objects=[
        ShapeObject("red", o.shape, o.size, o.position, o.center) for o in scene.objects])
    mask = render(silhouette).convert("L").point(lambda v: 255 if v > 30 else 0)
    if kind == "mask":
        return mask.convert("RGB")
    grown = mask.filter(ImageFilter.MaxFilter(3))
    shrunk = mask.filter(ImageFilter.MinFilter(3))
    edges = Image.fromarray((np.asarray(grown, dtype=np.int16) - np.asarray(shrunk, dtype=np.int16)).clip(0, 255).astype(np.uint8))
    return edges.convert("RGB")


def clutter(seed: int, spiky: float = 0.0, radius: tuple[float, float] = (5, 17)) -> Image.Image:
    """A picture of 1–3 random polygons (3–10 vertices at random radii: convex and concave, pointed and
    blunt) in the world's colours, on one of its backgrounds — no caption, no world shape. With
    `spiky`, that share of the polygons has thin points on alternating radii (3, 4, 6, 7 or 8 of
    them, never the star's 5): the fine tips a small star needs, at every size. `radius`: the range of
    the polygons' outer radii in px (a small star's is 7, a large one's 14).

    Image data for the VAE only: a VAE is a general image codec (SD's was trained on OpenImages, not
    on its captions), and one that has seen nothing but circles, squares and triangles cannot
    reconstruct a shape it has never seen, so no LoRA could teach it `star`. The U-Net and the text
    encoder never see these pictures."""
    rng = np.random.default_rng(seed)
    S = SIZE * SUPERSAMPLE
    img = Image.new("RGB", (S, S), BACKGROUNDS[str(rng.choice(list(BACKGROUNDS)))])
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(*radius) * SUPERSAMPLE
        cx, cy = rng.uniform(r, S - r, 2)
        n = int(rng.integers(3, 11))
        if spiky and rng.random() < spiky:  # points on alternating radii: thin tips at every size
            points = int(rng.choice([3, 4, 6, 7, 8]))  # never five: the star stays unseen
            angles = np.linspace(0, 2 * np.pi, 2 * points, endpoint=False) + rng.uniform(0, 2 * np.pi)
            radii = r * np.tile([1.0, rng.uniform(0.3, 0.6)], points)
        else:
            if rng.random() < 0.5:  # evenly spaced vertices at random radii, or random angles
                angles = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
            else:
                angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = r * rng.uniform(0.3, 1.0, n)
        draw.polygon([(cx + q * math.cos(a), cy + q * math.sin(a)) for q, a in zip(radii, angles)],
                     fill=COLOURS[str(rng.choice(list(COLOURS)))])
    return img.resize((SIZE, SIZE), Image.BOX)
