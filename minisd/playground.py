"""A live playground: type any prompt, move a control, and watch the picture, its denoising trajectory and
its cross-attention redraw. For workshops: `minisd playground` serves it in the browser (Voilà).

    from minisd.playground import Playground
    Playground(pipe).ui                      # in a notebook: the controls and the pictures

Two halves:

* `draw(pipe, Settings(...))` runs one generation and keeps what a learner scrubs through: the latents z_t
  after every step, the model's x̂₀ (its guess at the clean latents) at every step, and one cross-attention
  map per prompt token per step. The maps are averaged over layers and heads as each step ends and the
  full matrices dropped, so a 512-px model does not hold gigabytes of them.
* `Playground` lays ipywidgets around it. A changed setting draws again (each drawing is kept, so going
  back is instant); the step scrubber only decodes and paints.
"""

from __future__ import annotations

import io
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .diffusion import samplers
from .generate import decode_latents, embedded_guidance_dim
from .nn.attention import capture_attention
from .viz import attention_overlay, image_grid, to_pil, token_maps

MAX_WORDS = 12   # token maps shown per prompt (SD 1.x prompts run to 75 tokens)
KEEP = 32        # drawings kept for going back


@dataclass(frozen=True)
class Settings:
    """Everything one drawing depends on. `lora_scale` is the playground's LoRA's (0: off)."""
    prompt: str
    sampler: str | None = None      # None: the model's own (DDIM; Euler along the flow for a flow model; LCM)
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    lora_scale: float = 0.0
    control: bool = False


@dataclass
class Drawing:
    """One generation and its trajectory: per step i (0-based), latents[i] is z after step i, x0[i] the
    x̂₀ the model predicted at that step, maps[i] one (h, w) cross-attention map per token."""
    settings: Settings
    image: Tensor                       # (3, H, W) in [0, 1]
    latents: list[Tensor]               # (C, h, w) each
    x0: list[Tensor]                    # (C, h, w) each
    maps: list[Tensor]                  # (T, h', w') each
    words: list[tuple[int, str]]        # (token index, text) of the prompt's words
    timesteps: list[int]
    seconds: float


def prompt_words(pipe, prompt: str) -> list[tuple[int, str]]:
    """(token index, token text) for the prompt's tokens, start and end markers and padding left out."""
    tokens = pipe.tokenizer.decode(pipe.tokenizer([prompt], warn=False)[0])
    words = []
    for i, token in enumerate(tokens[1:], start=1):
        if token == "<|endoftext|>":
            break
        words.append((i, token.replace("</w>", "")))
    return words


@torch.inference_mode()
def draw(pipe, settings: Settings, *, lora: str | None = None, control_image=None) -> Drawing:
    """Generate one picture for `settings`, keeping its trajectory and per-step attention maps. `lora`:
    the name of a loaded LoRA, set to settings.lora_scale; `control_image`: used when settings.control.
    Capturing attention computes it the naive way (softmax(QKᵀ)V, not the fused kernel), so the picture
    is the pipeline's up to float rounding (about 1e-5)."""
    if settings.lora_scale and lora is None:
        raise ValueError(f"lora_scale {settings.lora_scale} needs a LoRA: pass lora=<the name of a loaded LoRA>")
    if settings.control and control_image is None:
        raise ValueError("control=True needs a control_image (and a ControlNet loaded in the pipeline)")
    latents, x0, maps, timesteps = [], [], [], []
    with capture_attention(pipe.unet) as captured:
        def on_step(i: int, t: Tensor, z: Tensor, x0_hat: Tensor) -> None:
            latents.append(z[0].float().cpu())
            x0.append(x0_hat[0].float().cpu())
            timesteps.append(int(t))
            maps.append(token_maps(captured).float().cpu())   # this step's calls, the conditional picture
            for calls in captured.values():
                calls.clear()

        if lora is not None:
            pipe.set_lora_scale(lora, settings.lora_scale)
        control = {"control_image": control_image} if settings.control else {}
        start = time.perf_counter()
        image = pipe(settings.prompt, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                     sampler=settings.sampler, seed=settings.seed, callback=on_step, output_type="pt", **control)[0]
        seconds = time.perf_counter() - start
    return Drawing(settings, image.float().cpu(), latents, x0, maps, prompt_words(pipe, settings.prompt), timesteps,
                   seconds)


def sampler_names(pipe) -> list[str]:
    """The samplers a pipeline's model can use: the flow samplers for a flow model, LCM for an LCM U-Net."""
    if pipe.scheduler.prediction_type == "flow":
        return list(samplers.FLOW_SAMPLERS)
    distilled = embedded_guidance_dim(pipe) is not None
    return [name for name in samplers.SAMPLERS if name != "lcm" or distilled]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _tile(image: Image.Image, size: int) -> Image.Image:
    return image.resize((size, size), Image.NEAREST if image.width <= size else Image.LANCZOS)


def _stack(parts: list[Image.Image], title: str) -> Image.Image:
    width = max(p.width for p in parts)
    out = Image.new("RGB", (width, 14 + sum(p.height for p in parts)), (255, 255, 255))
    ImageDraw.Draw(out).text((3, 2), title, fill=(0, 0, 0))
    y = 14
    for p in parts:
        out.paste(p, (0, y))
        y += p.height
    return out


class Playground:
    """ipywidgets around a pipeline: one or two prompts, sampler, steps, guidance, seed, a LoRA and a
    ControlNet switch, a scrubber over the steps. Show `playground.ui` in a notebook.

    lora: a LoRA file or folder (loaded now under the name "lora" and fused into the weights, at scale 0
    until its switch is on);
    controlnet with control_image: a ControlNet (loaded now) and the picture it is given when on.
    `tile`: pixels per picture on screen. What a setting change costs is shown under the pictures."""

    def __init__(self, pipe, prompts: tuple[str, str] = ("a red circle on the left", ""), *, steps: int = 20,
                 guidance_scale: float = 7.5, seed: int = 0, lora=None, controlnet=None, control_image=None,
                 tile: int = 128):
        import ipywidgets as w

        if (controlnet is None) != (control_image is None):
            raise ValueError("controlnet and control_image go together: give both or neither")
        self.pipe, self.tile = pipe, tile
        self.lora = pipe.load_lora(lora, scale=0.0, name="lora") if lora is not None else None
        if self.lora is not None:   # folded into the weights (at its scale, 0 while off): no cost per step
            pipe.fuse_lora(self.lora)
        if controlnet is not None:
            pipe.load_controlnet(controlnet)
        self.control_image = control_image
        self.drawings: OrderedDict[Settings, Drawing] = OrderedDict()
        self.last_seconds: list[float] = []

        own = samplers.default_sampler(pipe.scheduler.prediction_type) if embedded_guidance_dim(pipe) is None else "lcm"
        text = {"layout": w.Layout(width="48%"), "continuous_update": False}
        wide = {"style": {"description_width": "initial"}, "continuous_update": False}
        self.controls = {
            "prompt": w.Text(prompts[0], description="prompt", **text),
            "prompt_b": w.Text(prompts[1], description="compare", placeholder="a second prompt, side by side",
                               **text),
            "sampler": w.Dropdown(options=[(f"{s} (the model's own)" if s == own else s, s)
                                           for s in sampler_names(pipe)], value=own, description="sampler"),
            "steps": w.IntSlider(steps, min=1, max=50, description="steps", **wide),
            "guidance_scale": w.FloatSlider(guidance_scale, min=1.0, max=15.0, step=0.5, description="guidance",
                                            **wide),
            "seed": w.BoundedIntText(seed, min=0, max=2**31 - 1, description="seed", layout=w.Layout(width="160px")),
            "lora": w.Checkbox(False, description="LoRA", disabled=self.lora is None, indent=False),
            "lora_scale": w.FloatSlider(1.0, min=0.0, max=1.5, step=0.1, description="LoRA scale",
                                        disabled=self.lora is None, **wide),
            "control": w.Checkbox(False, description="ControlNet", disabled=control_image is None, indent=False),
        }
        self.step = w.IntSlider(steps, min=1, max=steps, description="step", continuous_update=True,
                                layout=w.Layout(width="60%"))
        self.views = [w.Image(format="png"), w.Image(format="png")]
        for view in self.views:
            view.add_class("minisd-playground-view")   # for a page's scripts and tests to find the pictures
        self.status = w.HTML()
        rows = [w.HBox([self.controls["prompt"], self.controls["prompt_b"]]),
                w.HBox([self.controls[k] for k in ("sampler", "steps", "guidance_scale", "seed")])]
        switches = [self.controls[k] for k in ("lora", "lora_scale", "control")]
        if control_image is not None:
            thumb = w.Image(value=png(_tile(Image.open(control_image) if isinstance(control_image, str)
                                            else control_image, 48)), format="png")
            switches.append(thumb)
        rows.append(w.HBox(switches))
        pictures = w.HBox(self.views, layout=w.Layout(align_items="flex-start"))   # each at its own height
        self.ui = w.VBox(rows + [self.step, pictures, self.status])
        for c in self.controls.values():
            c.observe(lambda _: self.redraw(), names="value")
        self.step.observe(lambda _: self.paint(), names="value")
        self.redraw()

    # ─── state ────────────────────────────────────────────────────────────────────────────────────
    def settings(self) -> list[Settings]:
        """The settings of each prompt shown (the second only when its box is not empty)."""
        c = self.controls
        base = Settings(c["prompt"].value, c["sampler"].value, c["steps"].value, c["guidance_scale"].value,
                        c["seed"].value, c["lora_scale"].value if c["lora"].value else 0.0, c["control"].value)
        second = c["prompt_b"].value.strip()
        return [base] + ([replace(base, prompt=second)] if second else [])

    def drawing(self, settings: Settings) -> Drawing:
        if settings in self.drawings:
            self.drawings.move_to_end(settings)
            return self.drawings[settings]
        d = draw(self.pipe, settings, lora=self.lora, control_image=self.control_image)
        self.drawings[settings] = d
        self.last_seconds.append(d.seconds)
        while len(self.drawings) > KEEP:
            self.drawings.popitem(last=False)
        return d

    # ─── drawing and painting ─────────────────────────────────────────────────────────────────────
    def redraw(self) -> None:
        """Draw what the controls say (kept drawings are reused) and paint the chosen step."""
        start = time.perf_counter()
        self.last_seconds = []
        try:
            drawings = [self.drawing(s) for s in self.settings()]
        except (ValueError, RuntimeError, KeyError) as error:   # a setting the model refuses: say so, keep the pictures
            self.status.value = f"<span style='color:#b00'>{type(error).__name__}: {error}</span>"
            return
        n, before = drawings[0].settings.steps, self.step.value
        with self.step.hold_trait_notifications():
            at_end = self.step.value == self.step.max
            self.step.max = n
            if at_end or self.step.value > n:
                self.step.value = n
        if self.step.value == before:   # else the scrubber's own observer has just painted
            self.paint(drawings)
        sampled = ", ".join(f"{s:.2f} s" for s in self.last_seconds) or "kept drawings"
        self.status.value = f"sampling: {sampled}; all: {time.perf_counter() - start:.2f} s"

    def paint(self, drawings: list[Drawing] | None = None) -> None:
        """Paint each prompt's column at the scrubber's step."""
        drawings = drawings or [self.drawings[s] for s in self.settings() if s in self.drawings]
        for view, d in zip(self.views, drawings):
            view.value = png(self.column(d, self.step.value))
        for view in self.views[len(drawings):]:
            view.value = b""

    def snapshot(self) -> Image.Image:
        """What the pictures show now, as one still image (for pages that cannot show live controls)."""
        columns = [self.column(self.drawings[s], self.step.value) for s in self.settings() if s in self.drawings]
        out = Image.new("RGB", (sum(c.width for c in columns) + 8 * (len(columns) - 1), max(c.height for c in columns)),
                        (255, 255, 255))
        x = 0
        for c in columns:
            out.paste(c, (x, 0))
            x += c.width + 8
        return out

    @torch.inference_mode()
    def column(self, d: Drawing, step: int) -> Image.Image:
        """The final picture, z_t and x̂₀ after `step` (1-based), and each word's attention at that step."""
        i = min(step, len(d.latents)) - 1
        z = d.latents[i]
        shown = z / z.std().clamp_min(1e-6)     # σ-samplers carry x = z_t·√(1+σ²): shown at unit spread
        device, dtype = self.pipe.device, self.pipe.dtype
        pictures = decode_latents(self.pipe, torch.stack([shown, d.x0[i]]).to(device, dtype)).cpu()
        final = to_pil(d.image, (0, 1))
        top = image_grid([_tile(final, self.tile), _tile(to_pil(pictures[0], (0, 1)), self.tile),
                          _tile(to_pil(pictures[1], (0, 1)), self.tile)],
                         labels=["picture", f"z_t after step {i + 1}/{len(d.latents)}", "x0: its guess"], nrow=3)
        words = d.words[:MAX_WORDS]
        parts = [top]
        if words:
            small = self.tile * 3 // 4
            maps = [_tile(attention_overlay(final, d.maps[i][k]), small) for k, _ in words]
            parts.append(image_grid(maps, labels=[t for _, t in words], nrow=max(1, (3 * self.tile) // small)))
        title = f"{d.settings.prompt!r}  t={d.timesteps[i]}"
        return _stack(parts, title[:80])


# ─── the notebook `minisd playground` serves (notebooks/playground.ipynb is this, executed) ───────
INTRO = """# The playground

Type a prompt and press Enter, or move any control: the picture is drawn again. Under each picture:
$z_t$, the latents after the chosen step (decoded by the VAE at unit spread, as noise looks), and $\\hat{x}_0$,
the model's guess at the finished picture at that step; below them, each word's cross-attention map
at that step (averaged over layers and heads, over the final picture). Drag **step** to scrub through
the denoising. A second prompt in **compare** is drawn beside the first with the same settings.

Things to try: guidance 1 against 7.5; one step against twenty; the same prompt with two seeds;
at which step does the guess stop changing, and when do *red* and *circle* find their object?"""

CODE = """from minisd.shapes import course

playground = course.playground()   # the tiny model (with its star LoRA and edge ControlNet), or $MINISD_MODEL
playground.ui"""

STILL = """playground.snapshot()   # the pictures above as a still image, for pages that show no live controls"""


def notebook(still: bool = True) -> dict:
    """The playground notebook (nbformat 4), unexecuted; `still`: with the cell that repeats the pictures as
    a still image (for GitHub; `minisd playground` serves the notebook without it)."""
    def cell(kind: str, text: str, i: int) -> dict:
        c = {"cell_type": kind, "id": f"playground-{i}", "metadata": {}, "source": text.splitlines(keepends=True)}
        return c | ({"execution_count": None, "outputs": []} if kind == "code" else {})

    cells = [cell("markdown", INTRO, 0), cell("code", CODE, 1)] + ([cell("code", STILL, 2)] if still else [])
    return {"cells": cells,
            "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                        "name": "python3"},
                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}
