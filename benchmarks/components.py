"""U-Net, VAE decoder and text encoder: minisd vs diffusers/transformers, same weights, same process.

    python benchmarks/components.py                       # CPU, SD 1.5-size modules, 256 px (32×32 latents)
    python benchmarks/components.py --device cuda --dtype float16 --size 512

Prints the median time of each forward pass and the ratio minisd / reference (< 1: minisd is faster),
as a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, minisd_modules, paired_medians, reference_modules  # noqa: E402

from minisd import SD15  # noqa: E402


def main(argv=None) -> list[tuple]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--size", type=int, default=256, help="image size in px (latents: size/8)")
    ap.add_argument("--batch", type=int, default=2, help="U-Net batch (2 = one image with CFG)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_grad_enabled(False)
    ref_unet, ref_vae, ref_text = reference_modules(SD15, device, dtype)
    unet, vae, text = minisd_modules(SD15, ref_unet, ref_vae, ref_text)
    vae.to(memory_format=torch.channels_last)  # as StableDiffusion runs it (pipeline.py); references as they come
    h = args.size // 8
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch, 4, h, h, generator=g).to(device, dtype)
    ctx = torch.randn(args.batch, 77, 768, generator=g).to(device, dtype)
    t = torch.tensor([500] * args.batch, device=device)
    ids = torch.randint(0, 49406, (args.batch, 77), generator=g).to(device)
    rows = []
    for name, ours, ref in (
        (f"U-Net, batch {args.batch}, {h}×{h} latents", lambda: unet(z, t, ctx), lambda: ref_unet(z, t, ctx).sample),
        (f"VAE decode, 1×4×{h}×{h} -> {args.size} px", lambda: vae.decode(z[:1]), lambda: ref_vae.decode(z[:1]).sample),
        (f"text encoder, batch {args.batch}×77", lambda: text(ids), lambda: ref_text(ids).last_hidden_state),
    ):
        diff = (ours().float() - ref().float()).abs().max().item()
        t_ours, t_ref = paired_medians(ours, ref, device, args.repeats)
        rows.append((name, t_ours, t_ref, diff))
    print(f"\n{environment(device)}, {args.dtype}, SD 1.5 shapes, random weights, median of {args.repeats}\n")
    print("| module | minisd (ms) | diffusers/transformers (ms) | ratio minisd/ref | max abs diff |")
    print("|---|---|---|---|---|")
    for name, a, b, d in rows:
        print(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.3f} | {d:.1e} |")
    return rows


if __name__ == "__main__":
    main()
