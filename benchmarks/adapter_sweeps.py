"""The shipped adapters' dials, measured: ControlNet step windows and LoRA scales.

    python benchmarks/adapter_sweeps.py [controlnet|lora|all]   # writes docs/results/adapter_sweeps.json

controlnet: mean layout IoU over the first 20 held-out layouts for the ControlNet applied in each of a few
windows of the steps (data/tiny_controlnet_edges). lora: the share of the 60 star prompts drawn as stars at
each scale of data/tiny_star_lora (`minisd.shapes.adapter_sweeps`). Each part keeps the other's numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from minisd import StableDiffusion
from minisd.pipeline import DATA
from minisd.shapes import adapter_sweeps as sw

OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "adapter_sweeps.json"
WINDOWS = [(0.0, 1.0), (0.0, 0.3), (0.3, 1.0), (0.5, 1.0)]
SCALES = [0.0, 0.5, 0.75, 1.0]


def save(results: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n")


def main(part: str = "all", n: int = 20) -> dict:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    pipe = StableDiffusion.from_pretrained("tiny", device="cpu")
    pipe.progress = False
    if part in ("controlnet", "all"):
        pipe.load_controlnet(DATA / "tiny_controlnet_edges")
        results["controlnet windows"] = {"layouts": n, "steps": 25, "scale": 1.0, "iou": {}}
        for window in WINDOWS:  # one window at a time, saved as it comes
            iou = sw.window_ious(pipe, [window], n=n)
            results["controlnet windows"]["iou"].update(iou)
            save(results)
            print(window, {k: round(float(np.mean(v)), 3) for k, v in iou.items()}, flush=True)
        pipe.unload_controlnet()
    if part in ("lora", "all"):
        pipe.load_lora(DATA / "tiny_star_lora", name="star")
        results["lora scales"] = {"prompts": "analyser.concept_prompts('star')", "steps": 25, "star": {}}
        for s in SCALES:
            stars = sw.star_rates(pipe, "star", [s])
            results["lora scales"]["star"].update(stars)
            save(results)
            print(s, {k: sum(v) / len(v) for k, v in stars.items()}, flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
