"""The shapes world: the miniature Stable Diffusion that minisd trains and ships.

    world.py      the data: scenes of coloured shapes, their captions, renders, control maps
    analyser.py   prompt adherence read from pictures (`minisd eval`), without the model under test
    clip.py       the tiny CLIP that trains the text encoder
    loop.py       what every training loop shares: log, checkpoints, the diffusion loss, EMA, input checks
    train.py      `minisd train` for the base model (VAE, CLIP, U-Net), and where every kind is started
    finetune.py   `minisd train lora|controlnet|inpaint|textual-inversion|dreambooth|dreambooth-lora`:
                  train_lora.py, train_controlnet.py, train_inpaint.py, train_ti.py, train_dreambooth.py (both
                  DreamBooths), one loop each, on
                  adapter_config.py (their config, the frozen base)
    concept_eval.py  the three ways to teach `star` measured alike (`minisd eval --embedding/--dreambooth`)
    course.py     what the notebooks share: the model to use, seeds
    pixel_ddpm.py notebook 02's pixel-space DDPM at 16×16 (no text, no VAE) and its shipped checkpoint

It builds on the library (minisd.models, minisd.pipeline, ...); nothing in the library imports it.
`from minisd import shapes` gives the world's vocabulary and rendering (the names of world.py).
"""

from .world import (BACKGROUNDS, BASE_SHAPES, COLOURS, JITTER, PHRASES, POSITIONS, SHAPES, SIZE, SIZES,
                    SUPERSAMPLE, VOCABULARY, Scene, ShapeObject, clutter, control_map, convex_hull, dataset,
                    make_caption, make_scene, notches, random_object, render, shape_polygon, to_tensor)

__all__ = ["BACKGROUNDS", "BASE_SHAPES", "COLOURS", "JITTER", "PHRASES", "POSITIONS", "SHAPES", "SIZE", "SIZES",
           "SUPERSAMPLE", "VOCABULARY", "Scene", "ShapeObject", "clutter", "control_map", "convex_hull", "dataset",
           "make_caption", "make_scene", "notches", "random_object", "render", "shape_polygon", "to_tensor"]
