"""Editing pictures on the shipped tiny model: DDIM inversion's round trip, and prompt-to-prompt word swaps.

    python benchmarks/editing.py              # about 15 minutes on one free CPU core; writes docs/results/editing.json
    python benchmarks/editing.py --inversion  # part 1 alone (about 5 minutes), the rest of the file kept
    python benchmarks/editing.py --null-text 20  # part 3 alone on the first 20 pictures, the rest kept

1. inversion: held-out one-object pictures inverted with their captions (DDIM at guidance 1) and redrawn: at
   guidance 1 (the round trip, beside the VAE's own), at 7.5 from the same z_T, from z_T inverted at 7.5, and at
   7.5 with the caption as the negative prompt (negative-prompt inversion, Miyake et al. 2023), and at 7.5 with
   the unconditional embedding tuned per step (null-text inversion, Mokady et al. 2023);
2. editing: a colour swap and a shape swap on each of `edit_eval.PICTURES` held-out pictures with `pipe.edit`'s
   settings (`minisd.shapes.edit_eval`), and the same swaps sampled from z_T without the attention swap;
3. the same edits with null-text inversion (`pipe.edit(..., null_text=True)`) beside plain inversion's, on the
   first pictures of part 2 (each edit runs its own optimisation: about 20 s an edit on one core).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minisd import StableDiffusion
from minisd.shapes import edit_eval as ee

OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "editing.json"
INVERSION_PICTURES = 12
REDRAWS = {  # name: (redraw guidance, inversion guidance, negative prompt = the caption)
    "guidance 1": (1.0, 1.0, False),
    "guidance 7.5, z_T inverted at 1": (7.5, 1.0, False),
    "guidance 7.5, z_T inverted at 7.5": (7.5, 7.5, False),
    "guidance 7.5, caption as negative prompt": (7.5, 1.0, True),
    "guidance 7.5, null-text inversion": (7.5, None, False),  # None: ee.null_text_reconstruction
}


def inversion(pipe, n: int = INVERSION_PICTURES, steps: int = ee.STEPS) -> dict:
    """Mean |error| (levels of 255) of the redrawn pictures, per way of redrawing, and the VAE's floor."""
    tasks = ee.edit_tasks(n)[::2]
    out = {}
    for name, (g, g_inv, negative) in REDRAWS.items():
        errors = [ee.null_text_reconstruction(pipe, t.image, t.prompt, steps, g) if g_inv is None else
                  ee.reconstruction(pipe, t.image, t.prompt, steps, g, g_inv, t.prompt if negative else None)
                  for t in tasks]
        out[name] = {"mean": float(np.mean([e["error"] for e in errors])),
                     "max": float(np.max([e["error"] for e in errors]))}
        if "vae floor" in errors[0]:
            out["VAE round trip"] = {"mean": float(np.mean([e["vae floor"] for e in errors])),
                                     "max": float(np.max([e["vae floor"] for e in errors]))}
        print("inversion", name, out[name], flush=True)
    return {"pictures": n, "steps": steps, "levels of 255": out}


def main(n: int = ee.PICTURES) -> dict:
    torch.set_num_threads(1)
    pipe = StableDiffusion.from_pretrained("tiny", device="cpu")
    pipe.progress = False
    t0 = time.perf_counter()
    results = {"model": "tiny", "threads": 1, "inversion": inversion(pipe)}
    results["edit"] = ee.evaluate(pipe, n)
    print("edit", {k: round(r["success"]["rate"], 3) for k, r in results["edit"]["rates"].items()}, flush=True)
    results["no attention swap"] = ee.evaluate(pipe, n, cross_replace=0.0, self_replace=0.0)
    print("no swap", {k: round(r["success"]["rate"], 3) for k, r in results["no attention swap"]["rates"].items()},
          flush=True)
    results["minutes"] = (time.perf_counter() - t0) / 60
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    return results


def null_text_edits(n: int) -> dict:
    """Part 3, written into the existing editing.json."""
    torch.set_num_threads(1)
    pipe = StableDiffusion.from_pretrained("tiny", device="cpu")
    pipe.progress = False
    results = json.loads(OUT.read_text())
    for key, null_text in (("edit, null-text inversion", True), ("edit, plain inversion, same pictures", False)):
        results[key] = ee.evaluate(pipe, n, null_text=null_text)
        print(key, {k: round(r["success"]["rate"], 3) for k, r in results[key]["rates"].items()}, flush=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    return results


def inversion_only() -> dict:
    """Part 1 again, written into the existing editing.json beside part 2's results."""
    torch.set_num_threads(1)
    pipe = StableDiffusion.from_pretrained("tiny", device="cpu")
    pipe.progress = False
    results = json.loads(OUT.read_text())
    t0 = time.perf_counter()
    results["inversion"] = inversion(pipe)
    results["inversion minutes"] = (time.perf_counter() - t0) / 60
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    if sys.argv[1:] == ["--inversion"]:
        inversion_only()
    elif sys.argv[1:2] == ["--null-text"]:
        null_text_edits(int(sys.argv[2]) if len(sys.argv) > 2 else 20)
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else ee.PICTURES)
