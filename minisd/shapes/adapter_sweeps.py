"""How the shipped adapters respond to their dials, measured on held-out cases with the shapes-world analyser.

    control windows   mean layout IoU (`analyser.layout_iou`) of the ControlNet applied only in a fraction of
                      the steps (`control_start`, `control_end`), on held-out layouts (`analyser.layout_scenes`)
    LoRA scale        the share of star prompts drawn as stars (`analyser.judge`) at each LoRA scale

`benchmarks/adapter_sweeps.py` runs both for the shipped adapters and writes docs/results/adapter_sweeps.json;
notebooks 10 and 11 read it and recompute a few cases live.
"""

from __future__ import annotations

import torch

from .analyser import concept_prompts, judge, layout_iou, layout_prompt, layout_scenes
from .world import control_map


def _noise(pipe, n: int, seed: int = 0) -> torch.Tensor:
    """Case i starts from the noise of seed `seed + i`, as `analyser.evaluate_controlnet` does."""
    side = pipe.unet.config.sample_size
    return torch.stack([torch.randn(4, side, side, generator=torch.Generator().manual_seed(seed + i))
                        for i in range(n)])


def window_ious(pipe, windows: list[tuple[float, float]], n: int = 20, steps: int = 25, scale: float = 1.0,
                batch: int = 20) -> dict[str, list[float]]:
    """Layout IoU of each of the first `n` held-out layouts, for the loaded ControlNet applied only during
    each window (start, end) of the steps, as fractions; keys "start–end"."""
    if not pipe.controlnets:
        raise ValueError("window_ious needs a loaded ControlNet (pipe.load_controlnet(...)); none is loaded")
    scenes = layout_scenes(n)
    prompts, maps, noise = [layout_prompt(s) for s in scenes], [control_map(s, "edges") for s in scenes], _noise(pipe, n)
    out = {}
    for start, end in windows:
        images = []
        for i in range(0, n, batch):
            images += pipe(prompts[i:i + batch], latents=noise[i:i + batch], num_inference_steps=steps,
                           control_image=maps[i:i + batch], controlnet_scale=scale, control_start=start,
                           control_end=end)
        out[f"{start:g}-{end:g}"] = [round(layout_iou(im, sc), 4) for im, sc in zip(images, scenes)]
    return out


def star_rates(pipe, lora_name: str, scales: list[float], n: int | None = None, steps: int = 25,
               batch: int = 20) -> dict[str, list[bool]]:
    """For each scale of the loaded LoRA `lora_name`: whether each of the first `n` star prompts
    (`analyser.concept_prompts("star")`, all 60 by default) came out a star; keys the scales as text.
    Leaves the LoRA at scale 1."""
    prompts = concept_prompts("star")[:n]
    noise = _noise(pipe, len(prompts))
    out = {}
    for s in scales:
        pipe.set_lora_scale(lora_name, s)
        images = []
        for i in range(0, len(prompts), batch):
            images += pipe(prompts[i:i + batch], latents=noise[i:i + batch], num_inference_steps=steps)
        out[f"{s:g}"] = [bool(judge(p, im)["shape"]) for p, im in zip(prompts, images)]
    pipe.set_lora_scale(lora_name, 1.0)
    return out
