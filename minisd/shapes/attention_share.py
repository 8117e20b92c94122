"""Where a prompt's words look: the share of a word's cross-attention that falls on its object.

Notebook 06 reads attention maps by eye; this measures them. Generate a two-object picture while
`capture_attention` records every cross-attention matrix, average them over layers, heads and steps
into one map per token (`token_maps`), and find each requested object in the picture by its colour
(`analyser.analyse`). For a word (the object's colour or shape word):

    share = (map mass inside the object's pixels) / (map mass over the whole picture)
    area  = (object's pixels) / (all pixels)  — the share a map spread evenly would get

The map is upsampled bilinearly from the U-Net's finest attention grid (16×16 for the tiny model) to
the picture, so a small object's share is limited by that blur.
"""

from __future__ import annotations

import itertools
import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import wilson_interval
from ..nn.attention import capture_attention
from ..viz import token_maps
from .analyser import analyse, parse
from .world import BASE_SHAPES, COLOURS, PHRASES


def mass_share(heat: torch.Tensor, mask: np.ndarray) -> float:
    """Share of a (h, w) attention map's mass inside a (H, W) boolean mask (the map upsampled to H×W)."""
    if mask.ndim != 2 or not mask.any():
        raise ValueError(f"mask must be a non-empty (H, W) boolean array, got shape {mask.shape} with {mask.sum()} pixels")
    up = F.interpolate(heat.float()[None, None], size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
    up = up.clamp_min(0)
    return float(up[torch.from_numpy(mask)].sum() / up.sum())


def two_object_prompts(n: int = 60, seed: int = 0) -> list[str]:
    """`n` different prompts "a <colour> <shape> on the left and a <colour> <shape> on the right" (or at
    the top and at the bottom), with two different colours and two different shapes, so that each
    word names one object."""
    combos = [(c, s, where) for c in itertools.permutations(COLOURS, 2) for s in itertools.permutations(BASE_SHAPES, 2)
              for where in (("left", "right"), ("top", "bottom"))]
    if not 1 <= n <= len(combos):
        raise ValueError(f"n must be between 1 and {len(combos)}, got {n}")
    picked = np.random.default_rng(seed).permutation(len(combos))[:n]
    return [" and ".join(f"{'an' if c == 'orange' else 'a'} {c} {s} {PHRASES[p]}" for c, s, p in zip(*combos[i]))
            for i in picked]


def word_shares(pipe, prompts: list[str], seed: int = 0, steps: int = 25, guidance_scale: float = 7.5) -> list[dict]:
    """One row per (prompt, object, word) for words "colour" and "shape": the picture's object of the
    requested colour (`found` False and no share when the picture lacks that colour), the word's
    `share` of attention inside that object and the object's `area` share. Colours must differ
    within a prompt, so that each colour names one object."""
    with capture_attention(pipe.backbone) as maps:  # the U-Net's cross-attention, or the MMDiT's image→text part
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed)
    cond = len(prompts) if guidance_scale > 1 else 0   # with CFG the prompts' half comes last
    rows = []
    for k, (prompt, image) in enumerate(zip(prompts, images)):
        wanted, _ = parse(prompt)
        if len({w.colour for w in wanted}) != len(wanted):
            raise ValueError(f"each object needs its own colour, got {prompt!r}")
        tokens = [t.replace("</w>", "") for t in pipe.tokenizer.decode(pipe.tokenizer([prompt])[0])]
        heat = token_maps(maps, batch_index=cond + k)
        analysis = analyse(image)
        for w in wanted:
            i = tokens.index(w.colour)   # the grammar puts the shape word right after the colour word
            obj = analysis.find(w.colour)
            for word, index in (("colour", i), ("shape", i + 1)):
                row = {"prompt": prompt, "seed": seed, "object": f"{w.colour} {w.shape}", "word": word,
                       "token": tokens[index], "found": obj is not None}
                if obj is not None:
                    row.update(share=mass_share(heat[index], obj.mask), area=float(obj.mask.mean()))
                rows.append(row)
    return rows


def summarise(rows: list[dict], word: str = "colour") -> dict:
    """For one kind of word ("colour" or "shape"): how often the object was found, the mean share and
    mean area over found objects, and how often the share beats the area (a map better than an even
    spread), with a 95% Wilson interval."""
    found = [r for r in rows if r["word"] == word and r["found"]]
    if not found:
        raise ValueError(f"no rows with word {word!r} and a found object")
    beats = sum(r["share"] > r["area"] for r in found)
    return {"objects": sum(r["word"] == word for r in rows), "found": len(found),
            "share": float(np.mean([r["share"] for r in found])), "area": float(np.mean([r["area"] for r in found])),
            "beats_area": beats / len(found), "beats_area_95": list(wilson_interval(beats, len(found)))}
