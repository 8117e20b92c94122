"""Training on the frozen finished model: a LoRA that teaches a new concept, a ControlNet that follows a map,
a 9-channel inpainting U-Net.

    minisd train lora                      # teach the tiny model `star` (never in its training data)
    minisd train controlnet                # a ControlNet that places objects where an edge map says
    minisd train inpaint                   # a 9-channel inpainting U-Net, as SD's inpainting model was made
    minisd train textual-inversion         # the frozen model's new word <star>: its vectors alone are learnt
    minisd train dreambooth                # the whole U-Net fine-tuned on stars, its prior kept by its own pictures
    minisd train dreambooth-lora           # the same data and prior, the star LoRA's low-rank updates trained

Each kind is one flat loop in its own file — train_lora.py, train_controlnet.py, train_inpaint.py, train_ti.py,
train_dreambooth.py — on the pieces every loop shares (loop.py) and those they share (adapter_config.py). Each
writes checkpoints and resumes, logs to <work>/log.txt, and saves what the course ships: the LoRA in
diffusers/PEFT and kohya layouts, the ControlNet as a diffusers ControlNetModel folder, the inpainting and
DreamBooth models as whole diffusers pipeline folders, the textual inversion in diffusers' and A1111's layouts.
An existing result in --out is replaced only with --force. Under
`torchrun --nproc_per_node N -m minisd train lora ...` --batch is the global batch, each process takes an
equal share of it, and the result is the one process's (dist.py, docs/training.md).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from .adapter_config import KIND_DEFAULTS, KINDS, AdapterConfig
from .train_controlnet import train_controlnet
from .train_dreambooth import train_dreambooth
from .train_inpaint import inpainting_unet, random_masks, train_inpaint
from .train_lora import loss_weights, train_lora
from .train_ti import train_textual_inversion

def train_adapter(cfg: AdapterConfig, force: bool = False) -> Path:
    """Train `cfg.kind` on the frozen base model; returns where the result was saved (an existing one is
    replaced only if `force`)."""
    loop = {"lora": train_lora, "controlnet": train_controlnet, "inpaint": train_inpaint,
            "textual-inversion": train_textual_inversion, "dreambooth": train_dreambooth,
            "dreambooth-lora": train_dreambooth}[cfg.kind]
    return loop(cfg, force)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="minisd train lora|controlnet|inpaint|textual-inversion|dreambooth|dreambooth-lora",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    for f, v in asdict(AdapterConfig()).items():
        if f != "kind":
            others = ", ".join(f"{kind}: {d[f]}" for kind, d in KIND_DEFAULTS.items() if f in d)
            parser.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=None,
                                help=f"default {v}" + (f" ({others})" if others else ""))
    parser.add_argument("--fresh", action="store_true", help="ignore the checkpoint in --work and start over")
    parser.add_argument("--force", action="store_true", help="overwrite a result already in --out")
    args = parser.parse_args(argv)
    given = {f: getattr(args, f) for f in asdict(AdapterConfig()) if f != "kind" and getattr(args, f) is not None}
    cfg = AdapterConfig.of(args.kind, **given)  # refuses careless values
    if args.fresh:
        (cfg.paths()[1] / f"{cfg.kind}.pt").unlink(missing_ok=True)
    return train_adapter(cfg, force=args.force)


__all__ = ["KINDS", "KIND_DEFAULTS", "AdapterConfig", "inpainting_unet", "loss_weights", "main", "random_masks",
           "train_adapter", "train_dreambooth", "train_textual_inversion"]
