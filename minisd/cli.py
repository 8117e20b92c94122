"""The `minisd` command line.

    minisd generate "a red circle on the left"                 # the shipped tiny model, CPU, seconds
    minisd generate "a blue square" -n 4 --sampler euler_a --seed 3 --out squares.png
    minisd generate --from squares-2.png                       # the same picture again, from its metadata
    minisd generate --from squares-2.png --steps 50 --out more.webp   # flags given override what it recorded
    minisd generate "a green triangle" --out - > tri.png       # the PNG to standard output
    minisd img2img "a green circle" --image in.png --strength 0.6
    minisd inpaint "a yellow triangle" --image in.png --mask mask.png
    minisd train all                                           # reproduce data/tiny from nothing
    minisd eval --model tiny                                   # prompt adherence table
    minisd bench                                               # seconds per image on this machine
    minisd playground                                          # the live playground in the browser (Voilà)
    minisd video "a red circle moving to the right" --out clip.gif   # a clip, with a motion module (--motion)

Pictures (.png, .jpg, .webp) carry their settings in AUTOMATIC1111's "parameters" format (PNG: a text
chunk; JPEG and WebP: the EXIF UserComment), which other Stable Diffusion tools read. Image i of
`-n N --seed S` is made from seed S+i alone and records it; without --seed (or with -1) a seed is
drawn and recorded. An error is one line on stderr and exit status 2 (--debug: the traceback).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from . import __version__, families, playground
from .canny import canny
from .diffusion.samplers import FLOW_SAMPLERS, SAMPLERS, default_sampler, get_sampler
from .formats.files import atomic_write
from .images import ANIMATIONS, mp4_available, save_animation
from .pipeline import StableDiffusion, locate
from .shapes import analyser, concept_eval, edit_eval, scoreboard, train, video_eval
from .shapes import train_mmdit, train_motion
from .viz import image_grid

MAX_SIZE = 4096        # px; SD 1.x at 2048 already needs tiling, beyond 4096 is a typo
MAX_SEED = 2**63 - 1   # torch.Generator.manual_seed takes a signed 64-bit seed
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
SAVE_OPTIONS = {"PNG": {}, "JPEG": {"quality": 95}, "WEBP": {"lossless": True}}
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # the Exif sub-IFD and its UserComment tag (EXIF 2.3, table 7)
UNICODE_PREFIX = b"UNICODE\0"            # UserComment's character code: UTF-16 big-endian follows (as piexif writes)
SAMPLER_LABELS = {name: s.label for name, s in {**SAMPLERS, **FLOW_SAMPLERS}.items()}  # "euler_a" -> "Euler a", as A1111 writes it

# Settings that a flag, a picture's metadata or this default fills, in that order (`--from`).
DEFAULTS = {"prompt": None, "negative": None, "steps": 25, "cfg": 7.5, "seed": None, "sampler": "ddim",
            "karras": False, "eta": 0.0, "width": None, "height": None, "num_images": 1, "clip_skip": 0,
            "model": "tiny", "controlnet_scale": 1.0, "canny": False}
MODE_DEFAULTS = {"generate": {}, "img2img": {"strength": 0.75}, "inpaint": {"strength": 0.75, "keep_unmasked": True}}


# ─── careless input: argparse types that refuse it with one line ──────────────────────────────────

class UsageError(ValueError):
    """A command line that cannot be run; `main` prints it as one line."""


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing the usage and exiting, so every error reads the same."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def int_in(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        value = whole_number(text)
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected a whole number {_range(lo, hi)}, got {value}")
        return value
    return parse


def float_in(lo: float, hi: float | None = None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected a number {_range(lo, hi)}, got {text}")
        return value
    return parse


def _range(lo, hi) -> str:
    return f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"


def image_size(text: str) -> int:
    value = whole_number(text)
    if value % 8 or not 8 <= value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"width and height must be multiples of 8 from 8 to {MAX_SIZE}, got {value}")
    return value


def sampler_name(text: str) -> str:
    try:
        return get_sampler(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device_name(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"minisd runs on cpu, cuda or mps, not {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available here (try --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: Apple's MPS is not available here (try --device cpu)")
    return text


STEPS, SEED = int_in(1), int_in(-1, MAX_SEED)
CFG, UNIT, SCALE = float_in(0.0), float_in(0.0, 1.0), float_in(0.0)


# ─── the parameters text (AUTOMATIC1111's "infotext") ───────────────────────────────────────────

def number(value: float) -> str:
    """7.0 -> "7", 0.3 -> "0.3": A1111's look, and repr's exact round trip for the rest."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def quote(value) -> str:
    """A1111's infotext quoting: values holding , : or a newline go in JSON double quotes."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def parameters_text(args: argparse.Namespace, seed: int, width: int, height: int, model: str,
                    loras: dict[str, tuple[float, str | None]], batch_size: int = 1) -> str:
    """Prompt (with a `<lora:name:scale>` tag per LoRA), "Negative prompt: ..." and one line of
    settings in A1111's words, each one that changes the picture (A1111's Clip skip = clip_skip + 1)."""
    prompt = " ".join([args.prompt, *(f"<lora:{name}:{number(scale)}>" for name, (scale, _) in loras.items())])
    settings = {"Steps": args.steps, "Sampler": SAMPLER_LABELS[args.sampler],
                "Schedule type": "Karras" if args.karras else None, "CFG scale": number(args.cfg), "Seed": seed,
                "Size": f"{width}x{height}", "Model": model,
                "Denoising strength": number(args.strength) if hasattr(args, "strength") else None,
                "Keep unmasked": "True" if getattr(args, "keep_unmasked", False) else None,
                "Clip skip": args.clip_skip + 1 if args.clip_skip else None,
                "Eta DDIM": number(args.eta) if args.eta else None}
    if args.controlnet is not None:  # the sd-webui-controlnet extension's field
        settings["ControlNet 0"] = (f"Module: {'canny' if args.canny else 'none'}, Model: {Path(args.controlnet).stem}, "
                                    f"Weight: {number(args.controlnet_scale)}")
    hashes = {name: h for name, (_, h) in loras.items() if h is not None}
    if hashes:
        settings["Lora hashes"] = ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in hashes.items())
    settings["Batch size"] = batch_size if batch_size > 1 else None
    settings["Version"] = f"minisd {__version__}"
    lines = [prompt]
    if args.negative:
        lines.append(f"Negative prompt: {args.negative}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


SETTING = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's infotext field pattern
LORA_TAG = re.compile(r"\s*<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def parse_parameters(text: str) -> tuple[str, str | None, dict[str, str]]:
    """A1111's parameters text -> (prompt, negative prompt or None, {field: value}), read as A1111 does."""
    *lines, last = text.strip().split("\n")
    if len(SETTING.findall(last)) < 3:  # no settings line: it is all prompt
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):]
        (negative if in_negative else prompt).append(line.strip())
    fields = {k: json.loads(v) if v.startswith('"') and v.endswith('"') and len(v) > 1 else v
              for k, v in SETTING.findall(last)}
    return "\n".join(prompt), "\n".join(negative) if in_negative else None, fields


def read_parameters(path: str | os.PathLike) -> str:
    """The parameters text of a PNG (text chunk) or a JPEG/WebP (EXIF UserComment)."""
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get("parameters")  # PNG: every text chunk, wherever it is
            comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT) if text is None else None
    except OSError as e:
        raise ValueError(f"{path} is not a picture minisd can read ({e})") from None
    if isinstance(comment, bytes):
        prefix, body = comment[:8], comment[8:]
        text = body.decode("utf-16-be" if prefix == UNICODE_PREFIX else "utf-8", errors="replace").rstrip("\0")
    if not text:
        raise ValueError(f"{path} carries no generation parameters (no PNG 'parameters' text or EXIF UserComment)")
    return text


# ─── --from: a picture's recorded settings as command-line settings ───────────────────────────────

KNOWN = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model", "Denoising strength",
         "Keep unmasked", "Clip skip", "Eta DDIM", "ControlNet 0", "Lora hashes", "Batch size", "Version",
         "Model hash"}


def recipe_from(path: str, mode: str) -> dict:
    """The settings recorded in the picture at `path`, under the flags' names (refused if careless)."""
    prompt, negative, fields = parse_parameters(read_parameters(path))

    def read(field: str, parse):
        try:
            return parse(fields[field])
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{path}: {field}: {e}") from None

    recipe = {"prompt": LORA_TAG.sub("", prompt), "negative": negative, "loras": {}}
    for tag in LORA_TAG.finditer(prompt):  # <lora:name:scale>, A1111's way of naming a LoRA in the prompt
        try:
            recipe["loras"][tag[1]] = SCALE(tag[2] or "1")
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{path}: {tag[0].strip()}: the scale is {e}") from None
    for field, key, parse in (("Steps", "steps", STEPS), ("CFG scale", "cfg", CFG), ("Seed", "seed", SEED),
                              ("Model", "model", str), ("Denoising strength", "strength", UNIT),
                              ("Eta DDIM", "eta", UNIT), ("Batch size", "num_images", int_in(1)),
                              ("Clip skip", "clip_skip", lambda v: int_in(1)(v) - 1),
                              ("Keep unmasked", "keep_unmasked", lambda v: v == "True")):
        if field in fields:
            recipe[key] = read(field, parse)
    if "Size" in fields:
        w, _, h = fields["Size"].partition("x")
        recipe["width"], recipe["height"] = read("Size", lambda _: (image_size(w), image_size(h)))
    if "Sampler" in fields:
        recipe.update(_sampler_from(path, fields["Sampler"], fields.get("Schedule type", "Automatic")))
    if "ControlNet 0" in fields:
        unit = dict(part.split(": ", 1) for part in fields["ControlNet 0"].split(", ") if ": " in part)
        recipe.update(controlnet_name=unit.get("Model"), canny=unit.get("Module") == "canny",
                      controlnet_scale=read("ControlNet 0", lambda _: SCALE(unit.get("Weight", "1"))))
    if "strength" in recipe and mode == "generate":
        raise ValueError(f"{path} was made by img2img or inpaint (Denoising strength {number(recipe['strength'])}): "
                         f"re-run it with `minisd img2img --from {path} --image IMAGE` (or inpaint)")
    unknown = sorted(set(fields) - KNOWN)
    if unknown:
        print(f"minisd: note: {path} records settings minisd does not have, ignored: {', '.join(unknown)}",
              file=sys.stderr)
    return recipe


def _sampler_from(path: str, label: str, schedule: str) -> dict:
    names = {v: k for k, v in SAMPLER_LABELS.items()}
    if label.endswith(" Karras") and label not in names:  # A1111 before 1.9 wrote "DPM++ 2M Karras"
        label, schedule = label[: -len(" Karras")], "Karras"
    if label not in names:
        raise ValueError(f"{path}: sampler {label!r} is not one minisd has ({', '.join(names)})")
    if schedule not in ("Automatic", "Karras"):
        raise ValueError(f"{path}: schedule type {schedule!r} is not one minisd has (Automatic, Karras)")
    return {"sampler": names[label], "karras": schedule == "Karras"}


# ─── settings: flags, then the picture's, then defaults; every check before any work ──────────────

def model_sampler(model: str) -> str:
    """The sampler a model folder calls for when none is named (flow_euler for a flow model, lcm for a
    latent consistency model, read from its scheduler config before anything is loaded; DDIM otherwise,
    and for anything loading will judge)."""
    config = Path(model) / "scheduler" / "scheduler_config.json"
    try:
        name = str(json.loads(config.read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        name = ""
    return "lcm" if name == "LCMScheduler" else default_sampler("flow" if name.startswith("FlowMatch") else "epsilon")


def resolve(args: argparse.Namespace, mode: str) -> dict:
    """Fill every setting of `args` in place; returns the recipe read from --from ({} without)."""
    if args.source_image is not None:
        check_picture(args.source_image, "--from")
    recipe = recipe_from(args.source_image, mode) if args.source_image is not None else {}
    if args.size is not None:
        args.width, args.height = args.width or args.size, args.height or args.size
    for key, default in {**DEFAULTS, **MODE_DEFAULTS[mode]}.items():
        if getattr(args, key) is None:
            setattr(args, key, recipe.get(key, model_sampler(args.model or recipe.get("model", DEFAULTS["model"]))
                                         if key == "sampler" else default))
    if args.seed is None or args.seed == -1:
        args.seed = random.randrange(2**32)  # A1111's range for a drawn seed
    if args.prompt is None:
        raise ValueError("give a prompt (or --from IMAGE to re-run a picture)")
    if LORA_TAG.search(args.prompt):  # a picture's own tags were taken out of its prompt above
        raise ValueError(f"LoRA tags in the prompt ({LORA_TAG.search(args.prompt)[0].strip()}) are not read: "
                         f"use --lora PATH[:SCALE]")
    recorded = recipe.get("controlnet_name")
    if recorded and args.controlnet is None:
        raise ValueError(f"{args.source_image} was made with the ControlNet {recorded!r}: give --controlnet PATH "
                         f"and --control-image IMAGE")
    if recipe.get("loras") and not args.lora:
        tags = " ".join(f"<lora:{n}:{number(s)}>" for n, s in recipe["loras"].items())
        raise ValueError(f"{args.source_image} was made with LoRAs ({tags}): give --lora PATH for each")
    return recipe


def check_settings(args: argparse.Namespace) -> None:
    """Refuse settings that contradict each other, text that is not text and inputs that are not there."""
    for name in ("prompt", "negative"):
        text = getattr(args, name)
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the {name} is not valid UTF-8 text (undecodable byte at position {e.start}); "
                             f"check the terminal's or the file's encoding") from None
    kind = get_sampler(args.sampler).kind
    if args.karras and kind != "sigma":
        sigma = ", ".join(k for k, v in SAMPLERS.items() if v.kind == "sigma")
        raise ValueError(f"--karras spaces noise levels: it needs one of {sigma}, not {args.sampler}")
    if args.eta and args.sampler != "ddim":
        raise ValueError(f"--eta is DDIM's stochasticity; {args.sampler} does not use it (give --sampler ddim)")
    if args.seed + args.num_images - 1 > MAX_SEED:
        raise ValueError(f"--seed {args.seed} with -n {args.num_images} runs past the largest seed, {MAX_SEED}")
    if (args.controlnet is None) != (args.control_image is None):
        raise ValueError("--controlnet and --control-image go together")
    if args.canny and args.control_image is None:
        raise ValueError("--canny takes the edges of --control-image: give --controlnet and --control-image")
    for flag, path in (("--image", getattr(args, "image", None)), ("--mask", getattr(args, "mask", None)),
                       ("--control-image", args.control_image)):
        if path is not None:
            check_picture(path, flag)
    if args.controlnet is not None and not Path(args.controlnet).exists():
        raise FileNotFoundError(f"--controlnet not found: {args.controlnet}")


def check_picture(path: str, flag: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} file not found: {path}")
    try:
        Image.open(path).close()
    except OSError:
        raise ValueError(f"{flag} {path} is not a picture (PNG, JPEG, WebP, ...)") from None


def lora_spec(spec: str) -> tuple[str, float | None]:
    """"PATH" or "PATH:SCALE" -> (path, scale or None)."""
    path, scale = spec, None
    if not Path(spec).exists() and ":" in spec:
        path, _, text = spec.rpartition(":")
        try:
            scale = SCALE(text)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--lora {spec}: the scale after ':' is {e}") from None
    if not Path(path).exists():
        raise FileNotFoundError(f"--lora file or folder not found: {path}")
    return path, scale


def check_output(out: str, n: int, force: bool) -> None:
    """`out` can be written, and writing it (and out-1.png, ...) loses nothing the user did not name."""
    if out == "-":
        if n > 1:
            raise ValueError("--out - writes one PNG to standard output: use -n 1, or name a file")
        return
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir():
        raise ValueError(f"--out {out} is a folder: name a file in it, e.g. {path / 'out.png'}")
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"--out {out}: expected a name ending in {', '.join(FORMATS)} (or - for standard output)")
    folder = next(p for p in path.absolute().parents if p.exists())
    if not folder.is_dir():
        raise ValueError(f"--out {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"--out {out}: cannot write in {folder}")
    for sibling in output_paths(path, n)[1:]:
        if not force and (sibling.exists() or sibling.is_symlink()) and not made_by_minisd(sibling):
            raise ValueError(f"{sibling} exists and minisd did not make it: pass --force to overwrite it, "
                             f"or choose another --out")


def output_paths(path: Path, n: int) -> list[Path]:
    """One picture: [path]. Several: [path (the grid), path-1, ..., path-n]."""
    return [path] + ([path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(n)] if n > 1 else [])


def made_by_minisd(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    try:
        return parse_parameters(read_parameters(path))[2].get("Version", "").startswith("minisd")
    except ValueError:
        return False


# ─── writing pictures: atomically, with their parameters ─────────────────────────────────────────

def save_picture(image: Image.Image, target, fmt: str, text: str) -> None:
    """PNG: a "parameters" text chunk. JPEG, WebP: the EXIF UserComment, UTF-16 after "UNICODE\\0" (as A1111)."""
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        image.save(target, "PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE_PREFIX + text.encode("utf-16-be")
        image.save(target, fmt, exif=exif, **SAVE_OPTIONS[fmt])


def save_pictures(images: list[Image.Image], texts: list[str], grid_text: str, out: str) -> list[Path]:
    """Write each picture (and a grid of several) atomically; a symlink at a target is replaced, its
    target left alone. `out` "-": the PNG to standard output. Returns the paths written."""
    if out == "-":
        save_picture(images[0], sys.stdout.buffer, "PNG", texts[0])
        sys.stdout.buffer.flush()
        return []
    paths = output_paths(Path(out), len(images))
    fmt = FORMATS[paths[0].suffix.lower()]
    jobs = list(zip(images, texts, paths[-len(images):]))
    if len(images) > 1:
        jobs.append((image_grid(images), grid_text, paths[0]))
    for image, text, path in jobs:
        save_file(image, path, fmt, text)
    return paths


def save_file(image: Image.Image, path: Path, fmt: str, text: str) -> None:
    """Into a temporary file beside `path`, then renamed over it: never a half-written picture."""
    atomic_write(path, lambda tmp: save_picture(image, tmp, fmt, text))


# ─── the generation commands ─────────────────────────────────────────────────────────────────────

def run_generation(args: argparse.Namespace, mode: str) -> None:
    recipe = resolve(args, mode)
    check_settings(args)
    lora_specs = [lora_spec(spec) for spec in args.lora]
    for path in args.embedding:
        if not Path(path).exists():
            raise FileNotFoundError(f"--embedding file or folder not found: {path}")
    check_output(args.out, args.num_images, args.force)
    t0 = time.time()
    pipe = StableDiffusion.from_pretrained(args.model, device=args.device)
    check_steps(pipe, args.sampler, args.steps)
    pipe.progress = not args.quiet
    loras = attach_loras(pipe, lora_specs, recipe.get("loras", {}))
    attach_embeddings(pipe, args)
    control = attach_controlnet(pipe, args)
    seeds = [args.seed + i for i in range(args.num_images)]
    images = [draw(pipe, args, mode, seed, control) for seed in seeds]
    w, h = images[0].size
    texts = [parameters_text(args, seed, w, h, pipe.name, loras) for seed in seeds]
    grid_text = parameters_text(args, seeds[0], w, h, pipe.name, loras, batch_size=len(seeds))
    written = save_pictures(images, texts, grid_text, args.out)
    where = f"saved {written[0]}" if written else "wrote the PNG to standard output"
    several = f" (grid of {len(images)}; single images beside it)" if len(images) > 1 else ""
    seed_text = f"seed {seeds[0]}" + (f"..{seeds[-1]}" if len(seeds) > 1 else "")
    print(f"{where}{several} — {seed_text}, {time.time() - t0:.1f}s", file=sys.stderr)


def check_steps(pipe: StableDiffusion, sampler: str, steps: int) -> None:
    """Discrete samplers take `steps` of the model's training timesteps: more than there are repeat them."""
    limit = pipe.scheduler.num_train_timesteps - pipe.scheduler.steps_offset
    if get_sampler(sampler).kind == "discrete" and steps > limit:
        raise ValueError(f"--steps {steps} is more than {sampler} can take from this model's "
                         f"{pipe.scheduler.num_train_timesteps} training timesteps: use at most {limit}")


def attach_loras(pipe: StableDiffusion, specs: list[tuple[str, float | None]],
                 recorded: dict[str, float]) -> dict[str, tuple[float, str | None]]:
    """Load each LoRA at its scale (else the picture's, else 1); returns {name: (scale, A1111 short hash)}."""
    loras = {}
    for path, scale in specs:
        name = Path(path).stem
        scale = scale if scale is not None else recorded.get(name, 1.0)
        pipe.load_lora(path, scale=scale, name=name)
        loras[name] = (scale, lora_hash(path))
    return loras


def attach_embeddings(pipe: StableDiffusion, args: argparse.Namespace) -> None:
    """Load each --embedding; then a <token> in the prompts that none of them added is an error, not a word the
    tokenizer silently cannot read."""
    for path in args.embedding:
        pipe.load_textual_inversion(path)
    for name in ("prompt", "negative"):
        for token in re.findall(r"<[^<>:\s]+>", getattr(args, name) or ""):
            if token not in pipe.tokenizer:
                loaded = ", ".join(pipe.textual_inversions) or "none"
                raise ValueError(f"the {name} names {token}, which no --embedding added (loaded: {loaded})")


def lora_hash(path: str) -> str | None:
    """A1111's "Lora hashes" entry: SHA-256 of a .safetensors file after its header (kohya's "addnet"
    hash), first 12 hex digits. None for other formats."""
    file = Path(path) / "pytorch_lora_weights.safetensors" if Path(path).is_dir() else Path(path)
    if file.suffix != ".safetensors" or not file.is_file():
        return None
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def attach_controlnet(pipe: StableDiffusion, args: argparse.Namespace) -> dict:
    if args.controlnet is None:
        return {}
    pipe.load_controlnet(args.controlnet)
    image = Image.open(args.control_image).convert("RGB")
    return {"control_image": canny(image) if args.canny else image, "controlnet_scale": args.controlnet_scale}


def draw(pipe: StableDiffusion, args: argparse.Namespace, mode: str, seed: int, control: dict) -> Image.Image:
    """One picture from its own seed: the seed it records makes it again, alone."""
    kwargs = dict(negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
                  sampler=args.sampler, karras=args.karras, eta=args.eta, height=args.height, width=args.width,
                  generator=torch.Generator().manual_seed(seed), clip_skip=args.clip_skip, **control)
    if mode == "generate":
        return pipe(args.prompt, **kwargs)[0]
    if mode == "img2img":
        return pipe.img2img(args.prompt, args.image, strength=args.strength, **kwargs)[0]
    return pipe.inpaint(args.prompt, args.image, args.mask, strength=args.strength,
                        keep_unmasked=args.keep_unmasked, **kwargs)[0]


def bench(args: argparse.Namespace) -> None:
    """Seconds per image of the shipped tiny model at the evaluation settings on this machine."""
    pipe = StableDiffusion.from_pretrained(args.model, device=args.device)
    pipe.progress = False
    check_steps(pipe, "ddim", args.steps)
    prompts = ["a red circle on the left"] * args.batch
    pipe(prompts[:1], num_inference_steps=2)  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
    dt = (time.perf_counter() - t0) / args.repeats
    print(f"{pipe.name}: {dt / args.batch:.3f} s per {pipe.image_size}px image ({args.steps} steps, CFG 7.5, "
          f"batch {args.batch}, {pipe.device}, {torch.get_num_threads()} threads)")


# ─── minisd video: a clip from the model and a motion module ─────────────────────────────────────

TINY_MOTION = Path(__file__).resolve().parent.parent / "data" / "tiny_motion"  # the tiny model's (minisd train motion)


def check_video_args(args: argparse.Namespace) -> Path:
    """Every check that needs no network, before any work: the text, --out, the model and the motion module.
    Returns the motion module's path."""
    for name in ("prompt", "negative"):
        try:
            (getattr(args, name) or "").encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the {name} is not valid UTF-8 text (undecodable byte at position {e.start})") from None
    out = Path(args.out)
    if args.out.endswith(("/", os.sep)) or out.is_dir():
        raise ValueError(f"--out {args.out} is a folder: name a file in it, e.g. {out / 'clip.gif'}")
    if out.suffix.lower() not in ANIMATIONS:
        raise ValueError(f"--out {args.out}: expected a name ending in {', '.join(ANIMATIONS)}")
    if out.suffix.lower() == ".mp4" and not mp4_available():
        raise ValueError(f"--out {args.out}: writing .mp4 needs imageio-ffmpeg and its ffmpeg (pip install "
                         f"imageio-ffmpeg); .gif and .webp need nothing more")
    folder = next(p for p in out.absolute().parents if p.exists())
    if not folder.is_dir():
        raise ValueError(f"--out {args.out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"--out {args.out}: cannot write in {folder}")
    motion = Path(args.motion).expanduser() if args.motion is not None else TINY_MOTION
    if args.motion is None and not motion.exists():
        raise FileNotFoundError(f"no motion module: give --motion PATH (a diffusers MotionAdapter folder or an "
                                f"AnimateDiff .ckpt/.safetensors); {motion} is made by `minisd train motion`")
    if not motion.exists():
        raise FileNotFoundError(f"--motion not found: {args.motion}")
    locate(args.model)  # FileNotFoundError for a model that is nowhere
    return motion


def run_video(args: argparse.Namespace) -> None:
    """A clip of --frames frames, written as an animation with its settings in the file's metadata."""
    motion = check_video_args(args)
    if args.size is not None:
        args.width, args.height = args.width or args.size, args.height or args.size
    args.sampler = args.sampler or model_sampler(args.model)
    if args.seed is None or args.seed == -1:
        args.seed = random.randrange(2**32)  # drawn, and recorded, as for pictures
    t0 = time.time()
    pipe = StableDiffusion.from_pretrained(args.model, device=args.device)
    check_steps(pipe, args.sampler, args.steps)
    pipe.progress = not args.quiet
    pipe.load_motion_module(motion)
    frames = pipe.video(args.prompt, num_frames=args.frames, negative_prompt=args.negative,
                        num_inference_steps=args.steps, guidance_scale=args.cfg, sampler=args.sampler,
                        height=args.height, width=args.width, generator=torch.Generator().manual_seed(args.seed))[0]
    w, h = frames[0].size
    text = (parameters_text(args, args.seed, w, h, pipe.name, {})
            + f", Frames: {len(frames)}, FPS: {args.fps}, Motion module: {quote(motion.name)}")
    out = Path(args.out)
    atomic_write(out, lambda tmp: save_animation(frames, tmp, ANIMATIONS[out.suffix.lower()], args.fps, text))
    print(f"saved {out} — {len(frames)} frames at {args.fps} fps, seed {args.seed}, {time.time() - t0:.1f}s",
          file=sys.stderr)


def add_video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help='what happens, e.g. "a red circle moving to the right"')
    p.add_argument("--out", default="clip.gif",
                   help="an animated .gif or .webp, or .mp4 with imageio-ffmpeg installed (default clip.gif); "
                        "the settings are written into it")
    p.add_argument("--model", default="tiny", help="tiny (default), an SD 1.x diffusers folder, file or Hub id")
    p.add_argument("--motion", default=None, metavar="PATH",
                   help="the motion module: a diffusers MotionAdapter folder or an AnimateDiff .ckpt/.safetensors "
                        "(default data/tiny_motion, the tiny model's, if it is there)")
    p.add_argument("--frames", type=int_in(1, 4096), default=8,
                   help="frames in the clip (default 8; at most the motion module's max_seq_length)")
    p.add_argument("--fps", type=int_in(1, 100), default=8, help="frames per second of the animation (default 8)")
    p.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt (what to steer away from)")
    p.add_argument("--steps", type=STEPS, default=DEFAULTS["steps"], help=f"sampling steps (default {DEFAULTS['steps']})")
    p.add_argument("--cfg", "--guidance", dest="cfg", type=CFG, default=DEFAULTS["cfg"],
                   help=f"classifier-free guidance scale; 1 turns it off (default {DEFAULTS['cfg']})")
    p.add_argument("--seed", type=SEED, default=None, help="random seed (default, or -1: a random one, recorded)")
    p.add_argument("--sampler", type=sampler_name, default=None,
                   help=f"one of: {', '.join(SAMPLERS)} (default {DEFAULTS['sampler']})")
    p.add_argument("--size", type=image_size, default=None, help="frame width and height in px (default: the model's)")
    p.add_argument("--width", type=image_size, default=None)
    p.add_argument("--height", type=image_size, default=None)
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, mps (default: the best available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.set_defaults(karras=False, eta=0.0, clip_skip=0, controlnet=None)  # read by parameters_text; no flags here


# ─── the parser ──────────────────────────────────────────────────────────────────────────────────

def check_model_source(model: str) -> None:
    """For a model another process will load: where it is (`pipeline.locate`), and for a folder, that it is a
    pipeline of a family minisd generates with; an error here, before any server starts."""
    path, _ = locate(model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"--model {model}: not a diffusers pipeline folder (no model_index.json)")
        families.check_generates(families.family_of_folder(path), path)


def serve_playground(args: argparse.Namespace) -> None:
    """Write the playground notebook to a temporary folder and serve it; the folder goes when the server stops."""
    check_model_source(args.model)
    lab = args.lab or importlib.util.find_spec("voila") is None
    if lab and not args.lab:
        print("minisd: Voilà is not installed (pip install voila): serving the playground in JupyterLab",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="minisd-playground-") as folder:
        notebook = Path(folder) / "playground.ipynb"
        notebook.write_text(json.dumps(playground.notebook(still=False), indent=1, ensure_ascii=False))
        if lab:
            command = [sys.executable, "-m", "jupyter", "lab", str(notebook), f"--ServerApp.root_dir={folder}",
                       f"--ServerApp.ip={args.ip}", f"--ServerApp.port={args.port}", "--ServerApp.port_retries=0"]
        else:
            command = [sys.executable, "-m", "voila", str(notebook), f"--Voila.ip={args.ip}", f"--port={args.port}",
                       "--Voila.port_retries=0"]
        command += ["--no-browser"] if args.no_browser else []
        print(f"minisd: the playground ({args.model}) at http://{args.ip}:{args.port}/ ; Ctrl-C stops it",
              file=sys.stderr)
        code = subprocess.call(command, env={**os.environ, "MINISD_MODEL": args.model}, cwd=folder)
    if code not in (0, -2, 130):   # -2 / 130: stopped with Ctrl-C
        raise OSError(f"the {'JupyterLab' if lab else 'Voilà'} server stopped with exit status {code}")


def add_generation_args(p: argparse.ArgumentParser, mode: str) -> None:
    d = {**DEFAULTS, **MODE_DEFAULTS[mode]}
    p.add_argument("prompt", nargs="?", default=None, help='what to draw, e.g. "a large red circle on the left"')
    p.add_argument("--from", dest="source_image", default=None, metavar="IMAGE",
                   help="re-run a picture from the settings it records (PNG, JPEG, WebP); flags given override them")
    p.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt (what to steer away from)")
    p.add_argument("--steps", type=STEPS, default=None, help=f"sampling steps (default {d['steps']})")
    p.add_argument("--cfg", type=CFG, default=None,
                   help=f"classifier-free guidance scale; 1 turns it off (default {d['cfg']})")
    p.add_argument("--seed", type=SEED, default=None,
                   help="random seed; image i of -n uses seed+i (default, or -1: a random one, recorded)")
    p.add_argument("--sampler", type=sampler_name, default=None,
                   help=f"one of: {', '.join(SAMPLER_LABELS)} (default {d['sampler']}; flow_euler for a flow model, lcm for an LCM)")
    p.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None,
                   help="Karras sigma spacing (euler, euler_a, heun, lms, dpmpp_2m)")
    p.add_argument("--eta", type=UNIT, default=None, help="DDIM stochasticity, 0..1 (default 0)")
    p.add_argument("--size", type=image_size, default=None,
                   help="image width and height in px (default: the model's, 64 for tiny)")
    p.add_argument("--width", type=image_size, default=None)
    p.add_argument("--height", type=image_size, default=None)
    p.add_argument("-n", "--num-images", type=int_in(1), default=None,
                   help="images to make, image i from seed+i (a grid is saved for n > 1)")
    p.add_argument("--clip-skip", type=int_in(0), default=None,
                   help="stop the text encoder this many layers early (A1111's Clip skip is this + 1)")
    p.add_argument("--model", default=None,
                   help="tiny (default), a diffusers folder, a .safetensors/.ckpt file or a Hub id")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, mps (default: the best available)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA file or folder (kohya, diffusers/PEFT), optionally with a scale; repeatable")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH",
                   help="a textual inversion (diffusers learned_embeds file or folder, A1111 .pt/.safetensors) whose "
                        "token the prompt may use, e.g. <star>; repeatable")
    p.add_argument("--controlnet", default=None, metavar="PATH", help="a ControlNet (diffusers folder or lllyasviel file)")
    p.add_argument("--control-image", default=None, metavar="PNG", help="the ControlNet's map (edges, mask, ...)")
    p.add_argument("--canny", action=argparse.BooleanOptionalAction, default=None,
                   help="take Canny edges of --control-image first")
    p.add_argument("--controlnet-scale", type=SCALE, default=None, help="strength of the ControlNet (default 1)")
    p.add_argument("--out", default="out.png",
                   help="output .png, .jpg or .webp (default out.png); - writes the PNG to standard output")
    p.add_argument("--force", action="store_true", help="overwrite out-1.png, ... even if minisd did not make them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def build_parser() -> Parser:
    parser = Parser(prog="minisd", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generation_args(sub.add_parser("generate", help="text to image"), "generate")
    i2i = sub.add_parser("img2img", help="image to image")
    add_generation_args(i2i, "img2img")
    i2i.add_argument("--image", required=True, help="the starting picture")
    i2i.add_argument("--strength", type=UNIT, default=None, help="0 keeps the image, 1 ignores it (default 0.75)")
    inp = sub.add_parser("inpaint", help="repaint the white part of a mask")
    add_generation_args(inp, "inpaint")
    inp.add_argument("--image", required=True, help="the picture")
    inp.add_argument("--mask", required=True, help="same size as the image; white = repaint")
    inp.add_argument("--strength", type=UNIT, default=None,
                     help="how much to change the masked part (default 0.75; the masked area is first filled from around it)")
    inp.add_argument("--keep-unmasked", action=argparse.BooleanOptionalAction, default=None,
                     help="paste the original pixels back outside the mask (default on; --no-keep-unmasked: as diffusers)")
    add_video_args(sub.add_parser("video", help="text to video with a motion module (AnimateDiff)"))
    sub.add_parser("train", help="train the shapes-world model (minisd train --help)")
    sub.add_parser("eval", help="prompt adherence on the shapes world (minisd eval --help)")
    b = sub.add_parser("bench", help="seconds per image on this machine")
    b.add_argument("--model", default="tiny")
    b.add_argument("--device", type=device_name, default=None)
    b.add_argument("--steps", type=STEPS, default=25)
    b.add_argument("--batch", type=int_in(1), default=8)
    b.add_argument("--repeats", type=int_in(1), default=3)
    pg = sub.add_parser("playground", help="any prompt, its trajectory and attention, live in the browser",
                        description="Serve the playground notebook as a web app with Voilà (or, with --lab or "
                                    "without Voilà installed, in JupyterLab) until Ctrl-C.")
    pg.add_argument("--model", default="tiny",
                    help="tiny (default: with its star LoRA and edge ControlNet), a diffusers folder, a "
                         ".safetensors/.ckpt file or a Hub id (a real model wants a GPU)")
    pg.add_argument("--port", type=int_in(1, 65535), default=8866, help="the port to serve on (default 8866)")
    pg.add_argument("--ip", default="127.0.0.1",
                    help="the address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for a room)")
    pg.add_argument("--lab", action="store_true", help="open it as a notebook in JupyterLab instead")
    pg.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    return parser


def run(argv: list[str]) -> None:
    if argv[:2] == ["train", "motion"]:  # the motion module (moving shapes): train_motion.py
        train_motion.main(argv[2:])
    elif argv[:2] == ["train", "mmdit"]:  # SD 3's transformer in the U-Net's place: train_mmdit.py
        train_mmdit.main(argv[2:])
    elif argv and argv[0] == "train":  # the training script has its own options
        train.main(argv[1:])
    elif argv and argv[0] == "eval":  # --fid's features read pictures with the analyser: it cannot import them
        analyser.main(argv[1:], fid=scoreboard.fid_table, teaching=concept_eval.compare, editing=edit_eval.edit_report,
                      video=video_eval.report)
    else:
        args = build_parser().parse_args(argv)
        if args.command == "bench":
            bench(args)
        elif args.command == "playground":
            serve_playground(args)
        elif args.command == "video":
            run_video(args)
        else:
            run_generation(args, args.command)


def main(argv: list[str] | None = None) -> int:
    """`minisd ...`: 0 when done; 2, with one line on stderr, for input it cannot use (--debug: raise)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[: argv.index("--") if "--" in argv else len(argv)]
    if debug:
        argv.remove("--debug")
    try:
        run(argv)
    except (ValueError, OSError) as e:  # WeightsError and UnicodeError are ValueErrors, FileNotFoundError an OSError
        if debug:
            raise
        print(f"minisd: error: {'; '.join(line.strip() for line in str(e).splitlines() if line.strip())}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pictures are written atomically: nothing half-written is left behind
        if debug:
            raise
        print("minisd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
