"""Features of shapes-world pictures for `minisd.metrics` (FID, KID): `features(images) -> (N, 59)`.

Inception-v3, the encoder behind published FIDs, learned its features from photographs; nothing
says they separate what matters on 64×64 flat shapes (a colour swapped, a shape lost), and it is a
large download. A small encoder trained here would measure whatever its training happened to teach
it. These features are fixed and read off the picture by the analyser (analyser.py), so every
number can be traced to something visible:

     6  objects by colour, counted (0, 1 or 2)
     4  objects by shape (circle, square, triangle, star), counted
     5  objects by position (left, right, top, bottom, center), counted
     2  objects by size (small, large), counted
    24  objects by colour × shape, counted: which colour is drawn as which shape
     3  the background (white, black, gray), one-hot
     1  edge width, px: pixels part background, part object colour (0.15 < α < 0.85) per pixel of the
        objects' outline; a render's anti-aliased edges give ≈ 0.75 px, a Gaussian blur of radius 1 ≈ 2.5
     1  off-palette colour: the mean distance (in 0–1 units of RGB) of every pixel from the nearest
        mix of the background and one palette colour; ≈ 0 for a render
     1  off-palette background: the distance of the border's median colour from the background named
    12  the mean colour (RGB in 0–1) of each 32×32 quarter: where the colour mass sits

What they cannot see: detail the analyser does not read — a wobbly circle is counted as a circle, a
shape it has no class for as the nearest class; two objects of one colour count as one (the analyser
keeps the largest piece of each colour); which colour sits where (position and colour are counted
apart); texture or noise inside a fill beyond the mean misfit. They know nothing outside the world:
a photograph gets numbers, but they mean little. FIDs on these features are comparable only with
each other, at equal numbers of pictures, beside the FID between two sets of renders (the floor).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .analyser import analyse, explain
from .world import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZE, SIZES

NAMES = (list(COLOURS) + [f"{s}s" for s in SHAPES] + [f"at {p}" for p in POSITIONS] + list(SIZES)
         + [f"{c} {s}" for c in COLOURS for s in SHAPES]
         + [f"on {b}" for b in BACKGROUNDS] + ["edge width", "off-palette colour", "off-palette background"]
         + [f"{q} {ch}" for q in ("top left", "top right", "bottom left", "bottom right") for ch in "RGB"])


def _pixels(images) -> list[np.ndarray]:
    """Each picture as (64, 64, 3) float32 RGB in 0..255, from a list of PIL images, a (N, 3, 64, 64)
    tensor in [-1, 1] (the VAE's range) or a (N, 64, 64, 3) uint8 array."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images tensor has shape {tuple(images.shape)}; "
                             f"expected (N, 3, {SIZE}, {SIZE}) in [-1, 1]")
        x = ((images.detach().to("cpu", torch.float32).clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1)
        out = list(x.numpy())
    elif isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images array has shape {images.shape} ({images.dtype}); "
                             f"expected (N, {SIZE}, {SIZE}, 3) uint8")
        out = list(images.astype(np.float32))
    else:
        out = []
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise ValueError(f"images[{i}] is a {type(im).__name__}; expected a PIL image")
            out.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    for i, px in enumerate(out):
        if px.shape != (SIZE, SIZE, 3):
            raise ValueError(f"images[{i}] is {px.shape[1]}×{px.shape[0]}; expected {SIZE}×{SIZE} (the shapes world)")
    return out


def _objects(px: np.ndarray) -> np.ndarray:
    """The 44 counts: colour, shape, position, size, colour × shape, background."""
    a = analyse(px)
    colour_shape, where, size = np.zeros((len(COLOURS), len(SHAPES))), np.zeros(len(POSITIONS)), np.zeros(len(SIZES))
    for o in a.objects:
        colour_shape[list(COLOURS).index(o.colour), SHAPES.index(o.shape)] += 1
        where[list(POSITIONS).index(o.position)] += 1
        size[list(SIZES).index(o.size)] += 1
    background = np.array([a.background == b for b in BACKGROUNDS], dtype=np.float64)
    # each factor the analyser reads counted on its own, as adherence scores them, and colour × shape
    return np.concatenate([colour_shape.sum(axis=1), colour_shape.sum(axis=0), where, size, colour_shape.ravel(),
                           background])


def _shrink(mask: np.ndarray, px: int = 1) -> np.ndarray:
    """The pixels of `mask` whose 4-neighbours, `px` steps out, are all in `mask` (erosion; the
    frame counts as in)."""
    for _ in range(px):
        p = np.pad(mask, 1, constant_values=True)
        mask = mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask


def _rendering(px: np.ndarray) -> np.ndarray:
    """The 3 rendering measures: edge width, off-palette colour, off-palette background."""
    bg_name, _, alpha, residual = explain(px)
    solid = alpha > 0.5
    outline = (solid & ~_shrink(solid)).sum()
    # soft pixels next to an object (3 px: a blur of radius 1 spreads about that far); a haze over
    # the whole background is off-palette colour, not edge
    soft = (alpha > 0.15) & (alpha < 0.85) & ~_shrink(~solid, 3)
    width = soft.sum() / max(outline, 1)  # px of soft edge per px of outline
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg_miss = np.linalg.norm(np.median(border, axis=0) - BACKGROUNDS[bg_name])
    return np.array([width, residual.mean() / 255, bg_miss / 255])


def features(images) -> np.ndarray:
    """(N, 59) float64 features (the module docstring lists them; `NAMES` names the columns) of N
    shapes-world pictures: a list of 64×64 PIL images, a (N, 3, 64, 64) tensor in [-1, 1] or a
    (N, 64, 64, 3) uint8 array. Deterministic; about 10 ms a picture on one CPU core."""
    rows = []
    for px in _pixels(images):
        h = SIZE // 2
        quarters = px.reshape(2, h, 2, h, 3).mean(axis=(1, 3)).ravel() / 255  # (2, 2, 3) -> 12
        rows.append(np.concatenate([_objects(px), _rendering(px), quarters]))
    if not rows:
        raise ValueError("images is empty; expected at least one picture")
    return np.stack(rows)
