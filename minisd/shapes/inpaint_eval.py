"""Does inpainting keep what it should? Held-out object replacements on each background, judged on three counts.

1. outside the mask: mean |change| of the pixels more than `MARGIN` px from the mask, in levels of 255;
2. the repainted area's background: the median colour of its rim (the `RIM` px just inside the mask,
   where the task's picture is background) read as the nearest of the world's backgrounds;
3. the new object: right colour, shape and position (`analyser.analyse`), and the other one still right.

`background_inpaint_tasks` makes the cases: two-object pictures on white, black and gray in turn, half
of the prompts naming the background. `benchmarks/inpaint_keeps.py` runs them for the shipped models
with diffusers' settings and with `pipe.inpaint`'s defaults and writes `docs/results/inpaint_keeps.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..generate import DIFFUSERS_INPAINT
from .analyser import InpaintTask, analyse, parse, replacement, two_object_scenes
from .world import BACKGROUNDS, render

MARGIN = 4  # px: pixels this close to the mask may take part in the feathered seam
RIM = 3     # px: the mask's inner rim, background in every task (masks are object boxes grown by 4 px)
DIFFUSERS = DIFFUSERS_INPAINT  # diffusers' inpainting: noise from strength 1, nothing pasted back


@dataclass
class BackgroundInpaintTask(InpaintTask):
    """An `InpaintTask` on a chosen background, which the prompt may name."""
    background: str
    named: bool


def background_inpaint_tasks(n: int = 60, seed: int = 9_100_000) -> list[BackgroundInpaintTask]:
    """Held-out two-object scenes (seeds no training run uses) on white, black and gray in turn, the
    background named in the prompt for tasks 0-2, 6-8, …: n = 60 gives 10 of each (background, named)."""
    names = list(BACKGROUNDS)
    rng = np.random.default_rng(seed)
    tasks = []
    for scene in islice(two_object_scenes(seed), n):
        j = len(tasks)
        scene.background, named = names[j % 3], (j // 3) % 2 == 0  # objects never take a background's colour
        k = (j // 6) % 2
        image = render(scene)
        new, mask = replacement(scene, k, rng, image.size)
        prompt = " and ".join(o.phrase(True, True) for o in (new if m == k else o for m, o in enumerate(scene.objects)))
        if named:
            prompt += f" on a {scene.background} background"
        tasks.append(BackgroundInpaintTask(image, mask, prompt, 1 - k, scene.background, named))
    return tasks


def regions(mask: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(outside, rim) boolean (H, W) maps: farther than MARGIN px from the mask; within RIM px inside it."""
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255 > 0.5).float()[None, None]
    near = F.max_pool2d(m, 2 * MARGIN + 1, stride=1, padding=MARGIN)[0, 0] > 0
    inner = -F.max_pool2d(-m, 2 * RIM + 1, stride=1, padding=RIM)[0, 0] > 0  # the mask shrunk by RIM px
    return (~near).numpy(), ((m[0, 0] > 0) & ~inner).numpy()


def judge_keeping(task: BackgroundInpaintTask, image: Image.Image) -> dict:
    """One result's three counts (see the module's docstring)."""
    outside, rim = regions(task.mask)
    got, start = np.asarray(image, dtype=np.float32), np.asarray(task.image, dtype=np.float32)
    rim_colour = np.median(got[rim], axis=0)
    rim_background = min(BACKGROUNDS, key=lambda b: np.linalg.norm(rim_colour - BACKGROUNDS[b]))
    wanted, _ = parse(task.prompt)
    a = analyse(image)
    right = [(o := a.find(w.colour)) is not None and o.shape == w.shape and o.position == w.position for w in wanted]
    return {"outside change": float(np.abs(got[outside] - start[outside]).mean()),
            "background kept": rim_background == task.background,
            "new object right": right[1 - task.kept], "other object kept": right[task.kept]}


def evaluate_inpaint_keeping(pipe, tasks: list[BackgroundInpaintTask], options: dict, steps: int = 25,
                             guidance_scale: float = 7.5, batch: int = 20, seed: int = 0) -> list[dict]:
    """Each task's counts (`judge_keeping`) for `pipe.inpaint(..., **options)`, `batch` tasks a call, the
    generator of call b seeded seed + b."""
    out = []
    for b in range(0, len(tasks), batch):
        part = tasks[b:b + batch]
        images = pipe.inpaint([t.prompt for t in part], [t.image for t in part], [t.mask for t in part],
                              num_inference_steps=steps, guidance_scale=guidance_scale,
                              generator=torch.Generator().manual_seed(seed + b // batch), **options)
        out += [judge_keeping(t, im) | {"background": t.background, "named": t.named} for t, im in zip(part, images)]
    return out


def summarise(rows: list[dict]) -> dict:
    """Means over the tasks, overall and by background and whether the prompt names it."""
    def means(rs: list[dict]) -> dict:
        keys = ("outside change", "background kept", "new object right", "other object kept")
        return {"n": len(rs), **{k: float(np.mean([r[k] for r in rs])) for k in keys},
                "max outside change": float(max(r["outside change"] for r in rs))}

    split = {f"{bg} {'named' if named else 'unnamed'}": [r for r in rows if (r["background"], r["named"]) == (bg, named)]
             for bg in BACKGROUNDS for named in (True, False)}
    return {"all": means(rows), **{k: means(rs) for k, rs in split.items() if rs}}
