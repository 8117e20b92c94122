"""Three ways to teach the tiny model `star`, head to head: the same 60 held-out star prompts and 60 ordinary
prompts, under the same noise draws, for the base model, the textual inversion, the LoRA and DreamBooth with
and without prior preservation. Writes docs/results/concepts.json (read by docs/adapters.md and notebook 15).

    python benchmarks/concepts.py                      # the shipped files, 3 draws (~10 min on 2 cores)
    python benchmarks/concepts.py --draws 1 --json /tmp/c.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from minisd import StableDiffusion
from minisd.formats.files import atomic_write_text
from minisd.shapes.concept_eval import rates, size_mb, training_minutes

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def minutes_of(folder: Path) -> float | None:
    """The training minutes a result records (training.json beside it), if it does."""
    return training_minutes(folder)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "docs" / "results" / "concepts.json"))
    ap.add_argument("--embedding", default=str(DATA / "tiny_star_embedding"))
    ap.add_argument("--lora", default=str(DATA / "tiny_star_lora"))
    ap.add_argument("--dreambooth", default=str(DATA / "tiny_star_dreambooth"))
    ap.add_argument("--dreambooth-noprior", default=str(DATA / "tiny_star_dreambooth_noprior"))
    args = ap.parse_args(argv)
    if args.draws < 1:
        raise SystemExit(f"--draws must be at least 1, got {args.draws}")

    base = StableDiffusion.from_pretrained(DATA / "tiny")
    base.progress = False
    rows, t0 = {}, time.time()

    def measure(label: str, pipe, word: str, files: dict) -> None:
        t = time.time()
        rows[label] = {"rates": rates(pipe, word, draws=args.draws), **files}
        print(f"{label}: {time.time() - t:.0f}s " + ", ".join(f"{k} {100 * v['rate']:.0f}%"
                                                              for k, v in rows[label]["rates"].items()), flush=True)

    measure("base model", base, "star", {"trained": "nothing", "file MB": 0.0, "train minutes": 0.0})
    token = base.load_textual_inversion(args.embedding)
    measure("textual inversion", base, token,
            {"trained": f"{token}: {base.textual_inversions[token].vectors.numel()} numbers",
             "file MB": size_mb(Path(args.embedding) / "learned_embeds.safetensors"),
             "train minutes": minutes_of(args.embedding)})
    base.unload_textual_inversion()
    base.load_lora(args.lora, name="star")
    measure("LoRA", base, "star", {"trained": "rank-64 LoRA on every U-Net layer",
                                   "file MB": size_mb(Path(args.lora) / "pytorch_lora_weights.safetensors"),
                                   "train minutes": minutes_of(args.lora)})
    base.unload_lora("star")
    for label, folder in (("DreamBooth", args.dreambooth), ("DreamBooth, no prior", args.dreambooth_noprior)):
        tuned = StableDiffusion.from_pretrained(folder)
        tuned.progress = False
        measure(label, tuned, "star", {"trained": "the whole U-Net", "file MB": size_mb(Path(folder) / "unet"),
                                       "train minutes": minutes_of(folder)})

    result = {"draws": args.draws, "steps": 25, "guidance_scale": 7.5, "sampler": "ddim", "rows": rows,
              "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "torch": torch.__version__},
              "seconds": round(time.time() - t0)}
    atomic_write_text(args.json, json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
