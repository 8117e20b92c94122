"""Inpainting with diffusers' settings and with `pipe.inpaint`'s defaults, on 60 held-out cases.

    python benchmarks/inpaint_keeps.py        # about 10 minutes on 2 CPU cores; writes docs/results/inpaint_keeps.json

For the shipped base model (blending) and data/tiny_inpaint (the 9-channel U-Net): mean |change| more
than 4 px from the mask, whether the repainted area's rim is still the picture's background, and the
analyser's verdict on the new and the kept object (`minisd.shapes.inpaint_eval`), overall and for each
of white, black and gray with the background named in the prompt or not (10 cases each).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from minisd import StableDiffusion
from minisd.pipeline import DATA
from minisd.shapes import inpaint_eval as ie

OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "inpaint_keeps.json"
MODELS = {"blending (tiny)": DATA / "tiny", "9-channel (tiny_inpaint)": DATA / "tiny_inpaint"}
SETTINGS = {"diffusers": ie.DIFFUSERS, "default": {}}


def main(n: int = 60) -> dict:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    tasks = ie.background_inpaint_tasks(n)
    results = {"cases": n, "steps": 25, "guidance_scale": 7.5, "margin_px": ie.MARGIN, "rim_px": ie.RIM}
    for label, folder in MODELS.items():
        pipe = StableDiffusion.from_pretrained(folder, device="cpu")
        pipe.progress = False
        results[label] = {name: ie.summarise(ie.evaluate_inpaint_keeping(pipe, tasks, options))
                          for name, options in SETTINGS.items()}
        for name, s in results[label].items():
            print(label, name, {k: round(v, 3) for k, v in s["all"].items()}, flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60)
