"""SD 1.5-size parity on a GPU: minisd vs diffusers/transformers with the same random weights, in
fp32 and fp16, U-Net at 64×64 latents (512 px), VAE decode to 512 px, text encoder.

    python benchmarks/parity_gpu.py [--device cuda]

Prints max / mean absolute and relative-max differences. The fp16 rows also show how far the
reference's own fp16 result is from its fp32 one: the scale that "equal within fp16" is judged by.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, minisd_modules, reference_modules  # noqa: E402

from minisd import SD15  # noqa: E402


def stats(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.double() - b.double()).abs()
    return f"{d.max().item():.2e} / {d.mean().item():.2e} / {d.max().item() / b.double().abs().max().item():.2e}"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--latent", type=int, default=64)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    h = args.latent
    z = torch.randn(2, 4, h, h, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([999, 1])
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    outputs = {}
    for dtype in (torch.float32, torch.float16):
        ref_unet, ref_vae, ref_text = reference_modules(SD15, device, torch.float32)
        ref_unet, ref_vae, ref_text = (m.to(dtype) for m in (ref_unet, ref_vae, ref_text))
        unet, vae, text = minisd_modules(SD15, ref_unet, ref_vae, ref_text)
        zz, cc, tt, ii = z.to(device, dtype), ctx.to(device, dtype), t.to(device), ids.to(device)
        outputs[dtype] = {
            "unet": (unet(zz, tt, cc), ref_unet(zz, tt, cc).sample),
            "vae decode": (vae.decode(zz[:1]), ref_vae.decode(zz[:1]).sample),
            "text encoder": (text(ii), ref_text(ii).last_hidden_state),
        }
        del ref_unet, ref_vae, ref_text, unet, vae, text
        torch.cuda.empty_cache() if device.type == "cuda" else None
    print(f"\n{environment(device)}; TF32 convs {torch.backends.cudnn.allow_tf32}, TF32 matmul "
          f"{torch.backends.cuda.matmul.allow_tf32}\n")
    print("| module | fp32: minisd vs ref (max / mean / rel max) | fp16: minisd vs ref | "
          "fp16 ref vs fp32 ref (the fp16 noise floor) |")
    print("|---|---|---|---|")
    for name in outputs[torch.float32]:
        ours32, ref32 = outputs[torch.float32][name]
        ours16, ref16 = outputs[torch.float16][name]
        print(f"| {name} | {stats(ours32, ref32)} | {stats(ours16, ref16)} | {stats(ref16, ref32)} |")


if __name__ == "__main__":
    main()
