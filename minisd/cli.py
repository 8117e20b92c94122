"""The `minisd` command line.

    minisd generate "a red circle on the left"                 # the shipped tiny model, CPU, seconds
    minisd generate "a blue square" -n 4 --sampler euler_a --seed 3 --out squares.png
    minisd img2img "a green circle" --image in.png --strength 0.6
    minisd inpaint "a yellow triangle" --image in.png --mask mask.png
    minisd train all                                           # reproduce data/tiny from nothing
    minisd eval --model tiny                                   # prompt adherence table
    minisd bench                                               # seconds per image on this machine

Saved PNGs carry the settings in a `parameters` text chunk, in the format other SD tools read.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

SAMPLER_LABELS = {"ddim": "DDIM", "ddpm": "DDPM", "pndm": "PLMS", "euler": "Euler", "euler_a": "Euler a",
                  "heun": "Heun", "lms": "LMS", "dpmpp_2m": "DPM++ 2M"}


def parameters_text(prompt: str, negative: str | None, steps: int, sampler: str, karras: bool, cfg: float,
                    seed: int, width: int, height: int, model: str, extra: dict | None = None) -> str:
    """The A1111-style 'parameters' block: prompt, negative prompt, then one line of settings."""
    label = SAMPLER_LABELS.get(sampler, sampler) + (" Karras" if karras else "")
    settings = {"Steps": steps, "Sampler": label, "CFG scale": cfg, "Seed": seed, "Size": f"{width}x{height}",
                "Model": model, **(extra or {})}
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    return "\n".join(lines)


def save_png(images, path: Path, parameters: str) -> list[Path]:
    """One image: `path`. Several: a grid at `path` and each image beside it (path-1.png, ...)."""
    from PIL import PngImagePlugin

    from .viz import image_grid

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if len(images) > 1:
        for i, img in enumerate(images):
            p = path.with_name(f"{path.stem}-{i + 1}{path.suffix}")
            img.save(p, pnginfo=info)
            written.append(p)
        image_grid(images).save(path, pnginfo=info)
    else:
        images[0].save(path, pnginfo=info)
    return [path] + written


def add_generation_args(p: argparse.ArgumentParser) -> None:
    from .diffusion.samplers import SAMPLERS

    p.add_argument("prompt", help='what to draw, e.g. "a large red circle on the left"')
    p.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt (what to steer away from)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale; 1 turns it off (default 7.5)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    p.add_argument("--sampler", default="ddim", help=f"one of: {', '.join(SAMPLERS)} (default ddim)")
    p.add_argument("--karras", action="store_true", help="Karras sigma spacing (euler, euler_a, heun, lms, dpmpp_2m)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity, 0..1 (default 0)")
    p.add_argument("--size", type=int, default=None, help="image width and height in px (default: the model's, 64 for tiny)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("-n", "--num-images", type=int, default=1, help="images to make (a grid is saved for n > 1)")
    p.add_argument("--clip-skip", type=int, default=0, help="stop the text encoder this many layers early")
    p.add_argument("--model", default="tiny", help="tiny (default), a diffusers folder, a .safetensors/.ckpt file or a Hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA file or folder (kohya, diffusers/PEFT), optionally with a scale; repeatable")
    p.add_argument("--controlnet", default=None, metavar="PATH", help="a ControlNet (diffusers folder or lllyasviel file)")
    p.add_argument("--control-image", default=None, metavar="PNG", help="the ControlNet's map (edges, mask, ...)")
    p.add_argument("--canny", action="store_true", help="take Canny edges of --control-image first")
    p.add_argument("--controlnet-scale", type=float, default=1.0, help="strength of the ControlNet (default 1)")
    p.add_argument("--out", default="out.png", help="output PNG (default out.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_generation(args: argparse.Namespace, mode: str) -> None:
    import torch

    from .pipeline import StableDiffusion
    from .diffusion.samplers import get_sampler

    get_sampler(args.sampler)  # unknown sampler: fail before loading anything
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        raise ValueError(f"-n must be at least 1, got {args.num_images}")
    for name in ("image", "mask", "control_image"):
        path = getattr(args, name, None)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')} file not found: {path}")
    if (args.controlnet is None) != (args.control_image is None):
        raise ValueError("--controlnet and --control-image go together")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    t0 = time.time()
    pipe = StableDiffusion.from_pretrained(args.model, device=args.device)
    pipe.progress = not args.quiet
    extra = {}
    for spec in args.lora:
        path, _, scale = spec.rpartition(":") if not Path(spec).exists() and ":" in spec else (spec, "", "1")
        name = pipe.load_lora(path, scale=float(scale))
        extra[f"Lora {name}"] = float(scale)
    control = {}
    if args.controlnet is not None:
        from PIL import Image

        from .canny import canny

        pipe.load_controlnet(args.controlnet)
        image = Image.open(args.control_image).convert("RGB")
        control = {"control_image": canny(image) if args.canny else image, "controlnet_scale": args.controlnet_scale}
        extra.update({"ControlNet": Path(args.controlnet).name, "ControlNet scale": args.controlnet_scale})
    width = args.width or args.size
    height = args.height or args.size
    kwargs = dict(negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
                  sampler=args.sampler, karras=args.karras, eta=args.eta, num_images_per_prompt=args.num_images,
                  generator=torch.Generator().manual_seed(seed), clip_skip=args.clip_skip, **control)
    if mode == "generate":
        images = pipe(args.prompt, height=height, width=width, **kwargs)
    elif mode == "img2img":
        images = pipe.img2img(args.prompt, args.image, strength=args.strength, height=height, width=width, **kwargs)
        extra["Denoising strength"] = args.strength
    else:
        images = pipe.inpaint(args.prompt, args.image, args.mask, strength=args.strength, height=height, width=width,
                              keep_unmasked=args.keep_unmasked, **kwargs)
        extra["Denoising strength"] = args.strength
    w, h = images[0].size
    text = parameters_text(args.prompt, args.negative, args.steps, args.sampler, args.karras, args.cfg, seed, w, h,
                           pipe.name, extra)
    written = save_png(images, Path(args.out), text)
    print(f"saved {written[0]}" + (f" (grid of {len(images)}; single images beside it)" if len(images) > 1 else "")
          + f" — seed {seed}, {time.time() - t0:.1f}s", file=sys.stderr)


def bench(args: argparse.Namespace) -> None:
    """Seconds per image of the shipped tiny model at the evaluation settings on this machine."""
    import torch

    from .pipeline import StableDiffusion

    pipe = StableDiffusion.from_pretrained(args.model, device=args.device)
    pipe.progress = False
    prompts = ["a red circle on the left"] * args.batch
    pipe(prompts[:1], num_inference_steps=2)  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
    dt = (time.perf_counter() - t0) / args.repeats
    print(f"{pipe.name}: {dt / args.batch:.3f} s per {pipe.image_size}px image ({args.steps} steps, CFG 7.5, "
          f"batch {args.batch}, {pipe.device}, {torch.get_num_threads()} threads)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":  # the training script has its own options
        from .shapes.train import main as train_main

        train_main(argv[1:])
        return 0
    if argv and argv[0] == "eval":
        from .shapes.analyser import main as eval_main

        eval_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="minisd", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text to image")
    add_generation_args(gen)
    i2i = sub.add_parser("img2img", help="image to image")
    add_generation_args(i2i)
    i2i.add_argument("--image", required=True, help="the starting picture")
    i2i.add_argument("--strength", type=float, default=0.75, help="0 keeps the image, 1 ignores it (default 0.75)")
    inp = sub.add_parser("inpaint", help="repaint the white part of a mask")
    add_generation_args(inp)
    inp.add_argument("--image", required=True, help="the picture")
    inp.add_argument("--mask", required=True, help="same size as the image; white = repaint")
    inp.add_argument("--strength", type=float, default=1.0, help="how much to change the masked part (default 1)")
    inp.add_argument("--keep-unmasked", action="store_true",
                     help="paste the original pixels back outside the mask (the VAE changes them a little)")
    sub.add_parser("train", help="train the shapes-world model (minisd train --help)")
    sub.add_parser("eval", help="prompt adherence on the shapes world (minisd eval --help)")
    b = sub.add_parser("bench", help="seconds per image on this machine")
    b.add_argument("--model", default="tiny")
    b.add_argument("--device", default=None)
    b.add_argument("--steps", type=int, default=25)
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            bench(args)
        else:
            run_generation(args, args.command)
    except (ValueError, FileNotFoundError) as e:  # bad input (WeightsError too): a message, not a traceback
        print(f"minisd {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
