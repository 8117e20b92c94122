"""Moving shapes: the shapes world in time, the clips a motion module learns from.

A clip is 8 frames of 64×64: ONE shape of the world (its colours, base shapes, sizes, backgrounds,
drawn by `world.render`) sliding in a straight line at a steady speed, from near one side of the
frame to near the other, so the motion is plain to see. Its caption is the world's one-object grammar
with a motion phrase in place of the position phrase:

    a [small|large] <colour> <shape> moving (to the left|to the right|up|down) [on a <bg> background]

Everything is deterministic per seed: `make_clip(seed)` always gives the same clip.

The held-out split: one (colour, shape, direction) combination in eight (`held_out`) never appears in
training clips (`training_clip`), and evaluation clips (`eval_clips`) come from seeds no training run
uses, half of them of those combinations: the motion must follow the direction word, not a memorised
pairing of an object with a way of moving.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from .world import BACKGROUNDS, BASE_SHAPES, COLOURS, POSITIONS, SIZE, SIZES, Scene, ShapeObject, render, to_tensor

FRAMES = 8   # frames per clip
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # unit step (x, y), image axes
MOTION_PHRASES = {"left": "moving to the left", "right": "moving to the right", "up": "moving up",
                  "down": "moving down"}
TRAVEL = (0.75, 1.0)   # the path's length, as a share of the room the shape has to move: speed varies a little
CROSS_JITTER = 6       # px, uniform: the centre's offset across the motion, from the middle of the frame
TRAIN_SEEDS = 20_000_000   # training clips: seeds from here (far from the image loops' seeds)
EVAL_SEEDS = 29_000_000    # evaluation clips: seeds from here, which no training run uses


@dataclass
class Clip:
    background: str
    colour: str
    shape: str
    size: str
    direction: str                       # a key of DIRECTIONS
    centers: list[tuple[float, float]]   # (x, y) px of the shape's centre, one per frame
    caption: str = ""
    mentions: dict = field(default_factory=dict)  # which optional attributes the caption names

    def scene(self, frame: int) -> Scene:
        """The world's scene of one frame (its position: the anchor nearest the centre)."""
        center = self.centers[frame]
        where = min(POSITIONS, key=lambda k: (POSITIONS[k][0] - center[0]) ** 2 + (POSITIONS[k][1] - center[1]) ** 2)
        return Scene(self.background, [ShapeObject(self.colour, self.shape, self.size, where, center)])


def held_out(colour: str, shape: str, direction: str) -> bool:
    """The combinations kept out of training: one in eight of the 72 (colour, shape, direction), every colour,
    shape and direction still seen in training with the others."""
    i = list(COLOURS).index(colour) + 2 * list(BASE_SHAPES).index(shape) + 3 * list(DIRECTIONS).index(direction)
    return i % 8 == 0


def path(rng: np.random.Generator, size: str, direction: str, frames: int = FRAMES) -> list[tuple[float, float]]:
    """The centres of a straight, steady path: it starts near the side the shape moves away from and covers
    TRAVEL of the room the whole shape has inside the frame; across the motion, the middle ± CROSS_JITTER."""
    lo, hi = SIZES[size] / 2 + 1, SIZE - SIZES[size] / 2 - 1  # the centre keeps the whole shape inside
    length = rng.uniform(*TRAVEL) * (hi - lo)
    start = lo + rng.uniform(0, (hi - lo) - length)  # from the near end of the free room
    along = [start + length * f / (frames - 1) for f in range(frames)]  # increasing
    dx, dy = DIRECTIONS[direction]
    if dx + dy < 0:  # left or up: from the high side to the low side
        along = [lo + hi - a for a in along]
    across = float(np.clip(SIZE / 2 + rng.uniform(-CROSS_JITTER, CROSS_JITTER), lo, hi))
    return [(a, across) if dx else (across, a) for a in along]


def make_caption(clip: Clip, rng: np.random.Generator) -> str:
    """The caption, optional attributes named with the world's probabilities (size 0.7, background 0.5)."""
    with_size, with_background = rng.random() < 0.7, rng.random() < 0.5
    obj = ShapeObject(clip.colour, clip.shape, clip.size, "center", clip.centers[0])
    text = f"{obj.phrase(with_size, False)} {MOTION_PHRASES[clip.direction]}"
    if with_background:
        text += f" on a {clip.background} background"
    clip.mentions = {"size": with_size, "background": with_background}
    return text


def make_clip(seed: int, frames: int = FRAMES, training: bool = False) -> Clip:
    """One random clip with its caption; the same seed always gives the same clip. `training`: never one of
    the held-out combinations (drawn again from the same generator until it is not)."""
    rng = np.random.default_rng(seed)
    while True:
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(list(BASE_SHAPES)))
        direction = str(rng.choice(list(DIRECTIONS)))
        if not (training and held_out(colour, shape, direction)):
            break
    size, background = str(rng.choice(list(SIZES))), str(rng.choice(list(BACKGROUNDS)))
    clip = Clip(background, colour, shape, size, direction, path(rng, size, direction, frames))
    clip.caption = make_caption(clip, rng)
    return clip


def training_clip(i: int, seed: int = 0) -> Clip:
    """Training clip i of a run seeded `seed`: never a held-out combination."""
    return make_clip(TRAIN_SEEDS + seed * 1_000_000 + i, training=True)


def eval_clips(n: int = 32, seed: int = 0) -> list[Clip]:
    """n held-out clips (seeds EVAL_SEEDS + seed·10⁶ onwards): each direction equally often, and half of
    each direction's clips of held-out combinations, half of the others."""
    wanted = {(d, h): n // 8 + (k < n % 8) for k, (d, h) in enumerate((d, h) for h in (True, False)
                                                                         for d in DIRECTIONS)}
    clips, i = [], 0
    while any(wanted.values()):
        clip = make_clip(EVAL_SEEDS + seed * 1_000_000 + i)
        key = (clip.direction, held_out(clip.colour, clip.shape, clip.direction))
        if wanted[key]:
            wanted[key] -= 1
            clips.append(clip)
        i += 1
    return clips


def render_clip(clip: Clip) -> list:
    """The frames as PIL pictures."""
    return [render(clip.scene(f)) for f in range(len(clip.centers))]


def clip_tensor(clip: Clip) -> torch.Tensor:
    """(F, 3, 64, 64) in [-1, 1], the VAE's input range."""
    return torch.stack([to_tensor(im) for im in render_clip(clip)])


def recaption(clip: Clip, rng: np.random.Generator) -> str:
    """A fresh caption for the clip (which optional attributes get named varies), the clip left as it was."""
    return make_caption(copy.copy(clip), rng)


__all__ = ["Clip", "DIRECTIONS", "FRAMES", "MOTION_PHRASES", "clip_tensor", "eval_clips", "held_out", "make_clip",
           "path", "recaption", "render_clip", "training_clip"]
