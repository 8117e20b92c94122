"""Whole text-to-image pipeline: minisd vs diffusers' StableDiffusionPipeline, same weights, same noise.

    python benchmarks/pipeline.py                          # CPU: a small SD-1.5-layout model, 64 px
    python benchmarks/pipeline.py --model sd15 --device cuda --dtype float16 --size 512 --steps 50

Prints seconds per image (median), U-Net iterations per second, peak GPU memory and the difference
between the two pipelines' images, as a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, minisd_modules, paired_medians, peak_memory, reference_modules  # noqa: E402

from minisd import SD15, StableDiffusion, TextEncoderConfig, Tokenizer, UNetConfig, VAEConfig  # noqa: E402

# SD 1.5's block layout at small widths: what CPU runs can afford
SMALL = replace(SD15, unet=UNetConfig(block_out_channels=(64, 128, 256, 256), num_heads=(4, 4, 4, 4),
                                      cross_attention_dim=256, sample_size=8),
                vae=VAEConfig(block_out_channels=(32, 64, 128, 128), sample_size=64),
                text_encoder=TextEncoderConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                               num_attention_heads=4))


def build(cfg, device, dtype):
    import diffusers
    from transformers import CLIPTokenizer

    ref_unet, ref_vae, ref_text = reference_modules(cfg, device, dtype)
    unet, vae, text = minisd_modules(cfg, ref_unet, ref_vae, ref_text)
    tok = Tokenizer.clip_vit_l()
    ours = StableDiffusion(unet, vae, text, tok, cfg.scheduler, name="random")
    ours.progress = False
    sched = diffusers.DDIMScheduler.from_config(cfg.scheduler.to_diffusers("DDIMScheduler"))
    ref = diffusers.StableDiffusionPipeline(vae=ref_vae, text_encoder=ref_text, unet=ref_unet,
                                            tokenizer=CLIPTokenizer.from_pretrained(str(tok.folder), model_max_length=77),
                                            scheduler=sched, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", choices=["small", "sd15"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", default=[25])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = SD15 if args.model == "sd15" else SMALL
    ours, ref = build(cfg, device, dtype)
    h = args.size // 8
    rows = []
    for batch in args.batch:
        for steps in args.steps:
            prompts = ["a photo of an astronaut riding a horse on mars"] * batch
            noise = torch.randn(batch, 4, h, h, generator=torch.Generator().manual_seed(0)).to(device, dtype)
            kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=args.size, width=args.size)

            def run_ours():
                return ours(prompts, latents=noise, sampler="ddim", output_type="pt", **kw)

            def run_ref():
                return ref(prompts, latents=noise, output_type="pt", **kw).images

            diff = (run_ours().float() - run_ref().float()).abs()
            t_ours, t_ref = paired_medians(run_ours, run_ref, device, args.repeats)
            m_ref, m_ours = peak_memory(run_ref, device), peak_memory(run_ours, device)
            rows.append((batch, steps, t_ours / batch, t_ref / batch, steps * batch / t_ours, steps * batch / t_ref,
                         m_ours, m_ref, diff.max().item(), diff.mean().item()))
    print(f"\n{environment(device)}, {args.dtype}, {args.model} random weights, {args.size} px, DDIM, CFG 7.5, "
          f"median of {args.repeats}\n")
    print("| batch | steps | minisd s/image | diffusers s/image | ratio | minisd it/s | diffusers it/s | "
          "minisd peak GiB | diffusers peak GiB | image diff max / mean |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b, s, a, r, ia, ir, ma, mr, dmax, dmean in rows:
        print(f"| {b} | {s} | {a:.3f} | {r:.3f} | {a / r:.3f} | {ia:.1f} | {ir:.1f} | {ma:.2f} | {mr:.2f} | "
              f"{dmax:.1e} / {dmean:.1e} |")
    return rows


if __name__ == "__main__":
    main()
