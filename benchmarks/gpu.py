"""SD 1.5 at real size on one GPU: minisd against diffusers, eager and compiled, in the same process.

    python benchmarks/gpu.py                                   # the issue's table (about 8 minutes on an H100)
    python benchmarks/gpu.py --model small --device cpu --size 64 --steps 4 --batch 1 --modes eager
                                                               # the same script on CPU, as the tests run it

Random weights at the exact SD 1.5 shapes (speed and memory do not depend on the values), copied
into both pipelines; the same prompt and initial noise; DDIM; CFG 7.5. For each mode, batch size and
step count it prints seconds per image, denoising it/s (one "it" = one CFG step = one U-Net call on
2·batch), peak GPU memory, and the difference between the two pipelines' images. Modes:

    eager      fp16, SDPA attention: what `from_pretrained` gives
    compiled   torch.compile of the U-Net and VAE decoder, default Inductor mode, in both libraries
    best       minisd only: fused QKV projections + torch.compile(mode="reduce-overhead") (CUDA graphs);
               its image difference is against diffusers' eager image
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, paired_medians, peak_memory, sync  # noqa: E402
from pipeline import SMALL, build  # noqa: E402

from minisd import SD15  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on mars"


def compile_reference(ref) -> None:
    """diffusers' recommended recipe (docs: optimization/torch2.0): channels-last U-Net, torch.compile."""
    ref.unet.to(memory_format=torch.channels_last)
    ref.unet = torch.compile(ref.unet, dynamic=False)
    ref.vae.decoder = torch.compile(ref.vae.decoder, dynamic=False)


def measure(ours, ref, args, mode: str, device, dtype, ref_images: dict) -> list[dict]:
    """Time both pipelines (or minisd alone when ref is None: its images are then compared with the
    reference's eager images, kept in ref_images)."""
    rows = []
    h = args.size // 8
    for batch in args.batch:
        noise = torch.randn(batch, 4, h, h, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        for steps in args.steps:
            kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=args.size, width=args.size)
            prompts = [PROMPT] * batch

            def run_ours():
                return ours(prompts, latents=noise, sampler="ddim", output_type="pt", **kw)

            def run_ref():
                return ref(prompts, latents=noise, output_type="pt", **kw).images

            t0 = time.perf_counter()
            a = run_ours()  # the first call compiles
            sync(device)
            warm = time.perf_counter() - t0
            if ref is not None:
                b = run_ref()
                ref_images.setdefault((batch, steps), b)  # the eager images, for the "best" rows
                t_ours, t_ref = paired_medians(run_ours, run_ref, device, args.repeats, warmup=1)
                m_ref = peak_memory(run_ref, device)
            else:
                b = ref_images.get((batch, steps))
                t_ours, _ = paired_medians(run_ours, lambda: None, device, args.repeats, warmup=0)
                m_ref = float("nan")
            diff = (a.float() - b.float()).abs() if b is not None else None
            m_ours = peak_memory(run_ours, device)
            rows.append(dict(mode=mode, batch=batch, steps=steps, first_call_s=warm,
                             minisd_s_per_image=t_ours / batch, diffusers_s_per_image=t_ref / batch if ref else None,
                             minisd_it_s=steps / t_ours, diffusers_it_s=steps / t_ref if ref else None,
                             minisd_peak_gib=m_ours, diffusers_peak_gib=m_ref,
                             diff_max=diff.max().item() if diff is not None else None,
                             diff_mean=diff.mean().item() if diff is not None else None))
            print(row_text(rows[-1]), flush=True)
    return rows


def row_text(r: dict) -> str:
    f = lambda v, fmt: "–" if v is None or v != v else format(v, fmt)  # noqa: E731
    ratio = r["diffusers_s_per_image"] / r["minisd_s_per_image"] if r["diffusers_s_per_image"] else None
    return (f"| {r['mode']} | {r['batch']} | {r['steps']} | {f(r['minisd_s_per_image'], '.3f')} | "
            f"{f(r['diffusers_s_per_image'], '.3f')} | {f(ratio, '.2f')}× | {f(r['minisd_it_s'], '.1f')} | "
            f"{f(r['diffusers_it_s'], '.1f')} | {f(r['minisd_peak_gib'], '.2f')} | {f(r['diffusers_peak_gib'], '.2f')} | "
            f"{f(r['diff_max'], '.1e')} / {f(r['diff_mean'], '.1e')} | {r['first_call_s']:.0f} |")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd15", choices=["sd15", "small"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 25])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled", "best"], choices=["eager", "compiled", "best"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as diffusers' benchmarks run
    ours, ref = build(SD15 if args.model == "sd15" else SMALL, device, dtype)
    print(f"\n{environment(device)}, {args.dtype}, {args.model} random weights, {args.size} px, DDIM, CFG 7.5, "
          f"median of {args.repeats}\n")
    print("| mode | batch | steps | minisd s/image | diffusers s/image | speed-up | minisd it/s | diffusers it/s | "
          "minisd peak GiB | diffusers peak GiB | image diff max / mean | first call s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows, ref_images = [], {}
    for mode in args.modes:
        if mode == "compiled":
            ours.compile()
            compile_reference(ref)
        elif mode == "best":  # compiled anew, on top of the fused projections
            ours.fuse_qkv_projections()
            ours.compile(mode="reduce-overhead" if device.type == "cuda" else None)
        rows += measure(ours, ref if mode != "best" else None, args, mode, device, dtype, ref_images)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": environment(device), "args": vars(args), "rows": rows},
                                              indent=1))
    return rows


if __name__ == "__main__":
    main()
