"""Does a prompt-to-prompt edit change the swapped word and keep the rest? Held-out pictures, two swaps each.

    edit_tasks(n)            n single-object pictures from seeds no training run uses (8_000_000 + i), each with
                             its caption, a colour swap ("a red circle" -> "a blue circle") and a shape swap
                             ("a red circle" -> "a red square"); base shapes only, every new colour and shape
                             equally often
    verdict(task, image)     the analyser's reading of the edited picture: the new word right, and the object's
                             other attributes (colour or shape, position, size, background) as they were
    evaluate(pipe, ...)      `pipe.edit` on every task; rates with 95% Wilson intervals per kind of swap
    reconstruction(...)      the inversion's round trip: z_0 -> z_T -> picture, in levels of 255

An edit *succeeds* when the analyser finds the new colour (or shape), the old colour is gone (a colour swap),
and the object's shape (or colour) and position are what they were. Size and background are reported beside
it, not required. `benchmarks/editing.py` writes `docs/results/editing.json`; `minisd eval --edit` runs the same.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from .. import editing
from ..metrics import wilson_interval
from .analyser import analyse, judge
from .world import BASE_SHAPES, COLOURS, PHRASES, Scene, make_scene, render, to_tensor

SEED = 8_000_000          # held out: training draws scenes from seeds below 8_000_000
PICTURES = 60             # 120 edits: 60 of each kind, some 4 minutes on one core
STEPS = 25                # DDIM steps of the inversion and of the edit, as `minisd eval` samples
GUIDANCE = 7.5            # the edit's classifier-free guidance scale
CROSS, SELF = 0.8, 0.4    # shares of the steps with the source's cross- and self-attention maps (Hertz et al.)
KINDS = ("colour", "shape")


class EditTask:
    """One picture, its caption, and one word of the caption swapped for another of the same kind."""

    def __init__(self, scene: Scene, kind: str, new: str):
        obj = scene.objects[0]
        self.scene, self.kind, self.new = scene, kind, new
        self.old = obj.colour if kind == "colour" else obj.shape
        self.image = render(scene)
        self.prompt = scene.caption
        self.target = swap_word(scene.caption, self.old, new)

    def wanted(self) -> str:
        """The edited picture in full, in the world's grammar: what `analyser.judge` checks it against."""
        obj = self.scene.objects[0]
        colour, shape = (self.new, obj.shape) if self.kind == "colour" else (obj.colour, self.new)
        return f"a {obj.size} {colour} {shape} {PHRASES[obj.position]} on a {self.scene.background} background"

    def __repr__(self) -> str:
        return f"EditTask({self.prompt!r} -> {self.target!r})"


def swap_word(caption: str, old: str, new: str) -> str:
    """The caption with the word `old` replaced by `new` (once, as a whole word), the article before it made to
    agree ("an orange circle" -> "a blue circle"); the token count stays the same, as a word swap needs."""
    words = caption.split(" ")
    if words.count(old) != 1:
        raise ValueError(f"swap_word needs {old!r} exactly once in {caption!r}")
    k = words.index(old)
    words[k] = new
    if k > 0 and words[k - 1] in ("a", "an"):
        words[k - 1] = "an" if new[0] in "aeiou" else "a"
    return " ".join(words)


def held_out_scenes(n: int, seed: int = SEED) -> list[Scene]:
    """n one-object scenes (base shapes, captions as in training) from seeds seed, seed + 1, …"""
    return [make_scene(seed + i, BASE_SHAPES, p_two=0.0) for i in range(n)]


def edit_tasks(n: int = 60, seed: int = SEED) -> list[EditTask]:
    """2n tasks: for picture i a colour swap to the (i mod 5)-th other colour and a shape swap to the
    (i mod 2)-th other base shape, so each new word comes up equally often."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer (pictures), got {n!r}")
    tasks = []
    for i, scene in enumerate(held_out_scenes(n, seed)):
        obj = scene.objects[0]
        colours = [c for c in COLOURS if c != obj.colour]
        shapes = [s for s in BASE_SHAPES if s != obj.shape]
        tasks += [EditTask(scene, "colour", colours[i % len(colours)]),
                  EditTask(scene, "shape", shapes[i % len(shapes)])]
    return tasks


def verdict(task: EditTask, image) -> dict[str, bool]:
    """The analyser on the edited picture (`analyser.judge` against `task.wanted()`): the new word right, the
    object's other word, position, size and background kept, the old colour gone (a colour swap); `success`:
    all of them but size and background."""
    j = judge(task.wanted(), image)
    other = "shape" if task.kind == "colour" else "colour"
    out = {"new word": j[task.kind], f"{other} kept": j[other], "position kept": j["position"],
           "size kept": j["size"], "background kept": j["background"]}
    if task.kind == "colour":
        out["old colour gone"] = analyse(image).find(task.old) is None
    out["success"] = all(ok for k, ok in out.items() if k not in ("size kept", "background kept"))
    return out


def rate(oks: list[bool]) -> dict[str, float]:
    """The share of True, how many, and its 95% Wilson interval."""
    low, high = wilson_interval(int(sum(oks)), len(oks))
    return {"rate": float(np.mean(oks)), "n": len(oks), "low": low, "high": high}


def run_edits(pipe, tasks: list[EditTask], steps: int = STEPS, guidance_scale: float = GUIDANCE,
              cross_replace: float = CROSS, self_replace: float = SELF, null_text: bool = False) -> list[Image.Image]:
    """`pipe.edit` on each task (the inversion takes the posterior mean: no seed; `null_text`: null-text inversion)."""
    return [pipe.edit(t.image, t.prompt, t.target, num_inference_steps=steps, seed=None, cross_replace=cross_replace,
                      self_replace=self_replace, guidance_scale=guidance_scale, null_text=null_text)[0]
            for t in tasks]


def summarise(tasks: list[EditTask], verdicts: list[dict[str, bool]]) -> dict[str, dict[str, dict[str, float]]]:
    """{kind: {attribute: rate}} over the tasks of each kind."""
    out = {}
    for kind in KINDS:
        vs = [v for t, v in zip(tasks, verdicts) if t.kind == kind]
        if vs:
            out[kind] = {k: rate([v[k] for v in vs]) for k in vs[0]}
    return out


def evaluate(pipe, n: int = PICTURES, steps: int = STEPS, guidance_scale: float = GUIDANCE, cross_replace: float = CROSS,
             self_replace: float = SELF, seed: int = SEED, null_text: bool = False) -> dict:
    """Every task of `edit_tasks(n, seed)` edited and judged: the settings, the rates per kind, and seconds."""
    tasks = edit_tasks(n, seed)
    t0 = time.perf_counter()
    images = run_edits(pipe, tasks, steps, guidance_scale, cross_replace, self_replace, null_text)
    seconds = time.perf_counter() - t0
    verdicts = [verdict(t, im) for t, im in zip(tasks, images)]
    return {"settings": {"pictures": n, "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
                         "cross_replace": cross_replace, "self_replace": self_replace, "null_text": null_text},
            "rates": summarise(tasks, verdicts), "seconds per edit": seconds / len(tasks)}


def levels(a, b) -> float:
    """Mean |difference| of two pictures in levels of 255 (PIL images or (3, H, W) in [0, 1])."""
    def arr(x):
        return np.asarray(x, dtype=np.float32) if isinstance(x, Image.Image) else x.permute(1, 2, 0).numpy() * 255
    return float(np.abs(arr(a) - arr(b)).mean())


def reconstruction(pipe, image: Image.Image, prompt: str, steps: int = STEPS, guidance_scale: float = 1.0,
                   invert_guidance: float = 1.0, negative_prompt: str | None = None) -> dict[str, float]:
    """The inversion's round trip in levels of 255: invert at `invert_guidance`, redraw with DDIM at
    `guidance_scale` (and `negative_prompt`), and compare with the picture; beside it the VAE's own round trip
    (encode, decode), what the error is measured against."""
    z_T = pipe.invert(image, prompt, num_inference_steps=steps, guidance_scale=invert_guidance)
    out = pipe(prompt, negative_prompt=negative_prompt, latents=z_T, sampler="ddim", guidance_scale=guidance_scale,
               num_inference_steps=steps, output_type="pt")[0]
    with torch.inference_mode():
        x = to_tensor(image)[None].to(pipe.device, pipe.vae.dtype)
        floor = (pipe.vae.decode(pipe.vae.encode(x).mode()).float().cpu()[0].clamp(-1, 1) + 1) / 2
    return {"error": levels(out.float().cpu(), image), "vae floor": levels(floor, image)}


def null_text_reconstruction(pipe, image: Image.Image, prompt: str, steps: int = STEPS,
                             guidance_scale: float = GUIDANCE) -> dict[str, float]:
    """`reconstruction` for null-text inversion (`editing.null_text_inversion`): invert, tune the unconditional
    embedding of each step, redraw at `guidance_scale` with them (`editing.redraw`)."""
    inversion = editing.null_text_inversion(pipe, image, prompt, num_inference_steps=steps,
                                            guidance_scale=guidance_scale)
    return {"error": levels(editing.redraw(pipe, inversion)[0].float().cpu(), image)}


def edit_report(pipe, steps: int = STEPS, seed: int = 0, limit: int | None = None) -> dict[str, dict[str, float]]:
    """`minisd eval --edit`: {kind of swap: {attribute: rate}} on PICTURES // limit pictures (seeds SEED + seed + i)
    with `pipe.edit`'s settings."""
    n = max(PICTURES // (limit or 1), 1)
    result = evaluate(pipe, n, steps, seed=SEED + seed)
    print(f"{2 * n} edits, {steps} steps: {result['seconds per edit']:.1f} s an edit", flush=True)
    columns = ("new word", "other word kept", "position kept", "size kept", "background kept", "success")
    return {f"{kind} swap": {c: r[c.replace("other word", "shape" if kind == "colour" else "colour")]["rate"]
                             for c in columns} for kind, r in result["rates"].items()}
