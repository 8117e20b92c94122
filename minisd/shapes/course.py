"""Helpers the notebooks share: which model to use, and a fixed seed.

    from minisd.shapes import course
    pipe = course.model()          # the shipped tiny model, or the real one named by $MINISD_MODEL

`MINISD_MODEL` unset -> the shapes-world model ("tiny", CPU, seconds). Set it to a diffusers folder,
a single-file checkpoint or a Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) and the same
cells run on real Stable Diffusion at 512 px (on a GPU).
"""

from __future__ import annotations

import os

import torch

from ..pipeline import DATA, StableDiffusion
from ..playground import Playground
from . import analyser, world


def model_name() -> str:
    return os.environ.get("MINISD_MODEL", "tiny")


def is_tiny() -> bool:
    return model_name() == "tiny"


def model(device: str | None = None) -> StableDiffusion:
    pipe = StableDiffusion.from_pretrained(model_name(), device=device)
    pipe.progress = False
    return pipe


def playground(pipe: StableDiffusion | None = None) -> Playground:
    """The workshop playground (`minisd.playground`). On the tiny model it comes with the star LoRA and the
    edge ControlNet, steered by the outlines of a held-out layout; on a real model, with neither."""
    pipe = pipe or model()
    if not is_tiny():
        return Playground(pipe, ("a photograph of an astronaut riding a horse", ""), steps=25)
    scene = analyser.layout_scenes(1)[0]
    return Playground(pipe, ("a red circle on the left", "a yellow star"), lora=DATA / "tiny_star_lora",
                      controlnet=DATA / "tiny_controlnet_edges", control_image=world.control_map(scene, "edges"))


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def in_ci() -> bool:
    """True under CI/nbval: notebooks shorten their slow demos (same code, fewer steps)."""
    return bool(os.environ.get("CI"))
