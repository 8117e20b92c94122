"""Editing pictures: DDIM inversion, prompt-to-prompt, and sampling steered by a loss.

    1. invert   the picture's latents z_0 walked *up* the DDIM schedule to z_T (Song et al. 2021, §4.3 and
                §5.4): DDIM run backwards, so that DDIM run forwards from z_T gives the picture back
                (`invert`, `ddim_invert`); with guidance, the unconditional embedding tuned per step so that
                the guided sampler retraces that path (Mokady et al. 2023: `null_text_inversion`, `redraw`)
    2. edit     the source prompt and the target prompt sampled as one batch from the same z_T, the
                target's attention maps replaced by the source's for the first steps (Hertz et al. 2022,
                "Prompt-to-Prompt Image Editing with Cross Attention Control"): same layout and shapes,
                the target's words (`edit`, `WordSwap`, `attention_editing`)
    3. guided   text-to-image steered by the gradient of a loss on the decoded prediction of the picture
                (classifier guidance with any differentiable score, Dhariwal & Nichol 2021, Bansal et al. 2023;
                the colour loss of Hugging Face's diffusion course): `guided`, `with_loss`

The attention maps are swapped by a wrapper module (`EditedAttention`) put in place of every `attn1` and
`attn2` of the U-Net for the call and taken out afterwards, as a LoRA swaps its layers in.

Legend: B batch, L query tokens (h·w latent pixels), S key tokens (L for self-, 77 for cross-attention),
nh heads, hd head dim, C = nh·hd.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .diffusion import denoisers as dn
from .diffusion import samplers
from .generate import (
    Start,
    build_denoiser,
    check_arguments,
    decode_latents,
    encode,
    generate,
    per_picture,
    txt2img_start,
)
from .images import image_to_tensor, load_image, to_pil
from .nn.attention import Attention, attention_probs

if TYPE_CHECKING:
    from .pipeline import StableDiffusion

# Prompt-to-prompt replaces self-attention only in layers of at most 16×16 query tokens (its
# `replace_self_attention`: at SD's 64×64 latents, the two coarsest levels); at finer levels the
# source's self-attention would copy its fine detail, colours included. The tiny model's finest is 16×16.
SELF_REPLACE_MAX_TOKENS = 16 * 16


# ─── 1. arguments ──────────────────────────────────────────────────────────────────────────────────

def check_prompt(name: str, prompt) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{name} must be a non-empty string, got {prompt!r}")


def check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")


def check_share(name: str, share) -> None:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (a share of the steps), got {share!r}")


def check_guidance(guidance_scale) -> None:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")


def check_pipe(pipe: StableDiffusion) -> None:
    """DDIM inversion walks the discrete ᾱ schedule of an SD 1.x/2.x U-Net."""
    if pipe.family != "sd1":
        raise ValueError(f"invert/edit run SD 1.x/2.x pipelines (a U-Net on a DDPM schedule), "
                         f"not family {pipe.family!r}")
    if pipe.scheduler.prediction_type == "flow":
        raise ValueError("DDIM inversion needs a model on the ᾱ schedule; this one predicts a flow velocity")


def image_tensor(image) -> Tensor:
    """The picture(s) as (n, 3, H, W) in [-1, 1], at their own size, sides multiples of 8 (what
    `images.image_to_tensor` would otherwise crop to), so that the reconstruction has the input's size."""
    kinds = (Image.Image, Tensor, np.ndarray, str, Path)
    several = isinstance(image, (list, tuple))
    if not (isinstance(image, kinds) or several and image and all(isinstance(i, kinds) for i in image)):
        raise ValueError(f"image must be a PIL image, a tensor (3, H, W) or (n, 3, H, W) in [0, 1], an array, a path "
                         f"or a list of these, got {type(image).__name__}")
    loaded = [load_image(i) for i in (image if several else [image])]  # paths read, arrays as tensors
    sizes = {(im.size[1], im.size[0]) if isinstance(im, Image.Image) else tuple(im.shape[-2:]) for im in loaded}
    for H, W in sizes:
        if H % 8 or W % 8 or H < 8 or W < 8:
            raise ValueError(f"image is {W}x{H} px; invert/edit need both sides positive multiples of 8")
    if len(sizes) > 1:
        raise ValueError(f"the pictures have different sizes {sorted(sizes)}; give pictures of one size")
    return image_to_tensor(loaded if several else loaded[0])  # NaN/inf and values outside [0, 1] refused here


def posterior(pipe: StableDiffusion, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Scaled latents of pixels x: the posterior mean μ (no generator: the usual choice for inversion,
    Mokady et al. 2023) or a sample z ~ q(z|x) (as diffusers' inversion pipelines draw it)."""
    q = pipe.vae.encode(x.to(pipe.device, pipe.vae.dtype))
    z = q.mode() if generator is None else q.sample(generator)
    return (z * pipe.vae.scaling_factor).to(pipe.dtype)


def seeded(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
    return torch.Generator("cpu").manual_seed(seed) if generator is None and seed is not None else generator


# ─── 2. DDIM inversion ─────────────────────────────────────────────────────────────────────────────

def ddim_invert(model, z: Tensor, s: samplers.Schedule, prediction_type: str = "epsilon",
                trajectory: list[Tensor] | None = None) -> Tensor:
    """z_0 -> z_T: `samplers.sample_ddim` (η = 0) run backwards, as diffusers' DDIMInverseScheduler.

    A DDIM step from t down to s = t − step_ratio (Song et al. 2021, eq. 12 with η = 0):

        x̂₀ = (z_t − √(1−ᾱ_t) ε̂) / √ᾱ_t,      z_s = √ᾱ_s x̂₀ + √(1−ᾱ_s) ε̂

    Divided by √ᾱ_s it is one Euler step of an ODE in x = z/√ᾱ and σ = √((1−ᾱ)/ᾱ) (their eqs. 13–14):

        z_s/√ᾱ_s = z_t/√ᾱ_t + (σ_s − σ_t) ε̂,      dx/dσ = ε̂

    and an ODE can be walked either way (their §4.3: "encode" x_0 to x_T). The same step from s up to t is
    z_t/√ᾱ_t = z_s/√ᾱ_s + (σ_t − σ_s) ε̂, written like the sampler's step:

        x̂₀ = (z_s − √(1−ᾱ_s) ε̂) / √ᾱ_s,      z_t = √ᾱ_t x̂₀ + √(1−ᾱ_t) ε̂         (the update below)

    Undoing the sampler's step exactly needs its ε̂(z_t, t), and z_t is what we are computing: take ε̂(z_s, t)
    instead, the network at the current latent and at the timestep the sampler will call it with when it
    steps from t back to s. Each step is then off by (σ_t − σ_s)·(ε̂(z_t, t) − ε̂(z_s, t)) = O((σ_t − σ_s)²),
    and the round trip's error shrinks with the step size. The walk is the sampler's in reverse, step for
    step: its timesteps reversed, the first step starting at the ᾱ "before" the first timestep
    (`final_alpha`: 1, or ᾱ_0 when set_alpha_to_one is False) where the sampler ends.
    model(z, t): the (guided) network output, a prediction of `prediction_type` (ε, v or ẑ₀). `trajectory`, if
    given, receives every latent of the walk, z_0 first and z_T last."""
    acp = s.alphas_cumprod
    if trajectory is not None:
        trajectory.append(z)
    for t in s.timesteps.flip(0):
        a_t = acp[int(t)].item()                                       # the level stepped up to
        a_s = acp[int(t) - s.step_ratio].item() if int(t) - s.step_ratio >= 0 else s.final_alpha  # the current one
        out = model(z, t)
        e, x0_hat = dn.to_eps(out, z, a_s, prediction_type), dn.to_x0(out, z, a_s, prediction_type)
        z = a_t**0.5 * x0_hat + (1 - a_t) ** 0.5 * e
        if trajectory is not None:
            trajectory.append(z)
    return z


@torch.inference_mode()
def invert(pipe: StableDiffusion, image, prompt: str | list[str], num_inference_steps: int = 50,
           guidance_scale: float = 1.0, seed: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The latents z_T (B, 4, h, w) from which DDIM (η = 0) with `prompt` and `guidance_scale` redraws
    `image`: `pipe(prompt, latents=z_T, sampler="ddim", guidance_scale=1.0, num_inference_steps=n)` gives
    the picture back, up to the VAE's round trip and the inversion's O(step) error (`ddim_invert`).
    `image`: one picture or several ((n, 3, H, W) tensor in [0, 1], or a list), sides multiples of 8;
    `prompt`: one for all, or one per picture. seed/generator: draw z ~ q(z|x) rather than take its mean."""
    check_pipe(pipe)
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise ValueError(f"prompt must be a non-empty string or a list of them, got {prompt!r}")
    for p in prompts:
        check_prompt("prompt", p)
    check_steps(num_inference_steps)
    check_guidance(guidance_scale)
    generator = seeded(seed, generator)
    x = image_tensor(image)
    B = max(len(x), len(prompts))
    cond, uncond = pipe.encode_prompt(prompts, None, guidance_scale)
    cond, uncond = per_picture(cond, B, "prompt"), per_picture(uncond, B, "prompt") if uncond is not None else None
    z0 = per_picture(posterior(pipe, x, generator), B, "image")
    schedule = samplers.make_schedule("ddim", num_inference_steps, pipe.scheduler)
    check = dn.FiniteCheck(pipe.nan_check, schedule.timesteps)
    model = build_denoiser(pipe, cond, uncond, guidance_scale, schedule, Start(z0), None, x.shape[-2:], check)
    z_T = ddim_invert(model, z0, schedule, pipe.scheduler.prediction_type)
    check.flush()
    return z_T


@dataclass
class NullTextInversion:
    """What `null_text_inversion` found: DDIM from `latents` with `prompt`, guided at `guidance_scale` against
    `null_embeddings[i]` (not the empty prompt's) at step i, redraws the picture (`redraw`)."""
    latents: Tensor          # z_T (1, 4, h, w): plain DDIM inversion's, at guidance 1
    null_embeddings: Tensor  # (steps, 1, T, E): the unconditional branch's text embedding, one per sampling step
    prompt: str
    guidance_scale: float
    losses: list[float]      # each step's last ‖z_{t−1} − z*_{t−1}‖² (mean over the latent), after optimising


def ddim_step(out: Tensor, z: Tensor, a_t: float, a_prev: float, prediction_type: str) -> Tensor:
    """One DDIM step (η = 0) from level ᾱ_t to ᾱ_prev, as `samplers.sample_ddim` takes it, differentiably."""
    e, x0_hat = dn.to_eps(out, z, a_t, prediction_type), dn.to_x0(out, z, a_t, prediction_type)
    return a_prev**0.5 * x0_hat + (1 - a_prev) ** 0.5 * e


def null_text_inversion(pipe: StableDiffusion, image, prompt: str, num_inference_steps: int = 50,
                        guidance_scale: float = 7.5, inner_steps: int = 10, lr: float = 1e-2,
                        tolerance: float = 1e-5, seed: int | None = None,
                        generator: torch.Generator | None = None) -> NullTextInversion:
    """Null-text inversion (Mokady et al. 2023, "Null-text Inversion for Editing Real Images", alg. 1).

    Plain inversion (`invert`, guidance 1) gives the pivots z*_0, ..., z*_T. Sampling from z*_T at guidance
    w > 1 leaves them, since each guided step differs from the unguided one by (w − 1)(ε(z, c) − ε(z, ∅)).
    Null-text inversion keeps the network and the prompt and tunes only ∅, the embedding the unconditional
    branch reads, one per step: starting at z̄_T = z*_T, for each step t

        ∅_t ← argmin ‖z*_{t−1} − DDIM(z̄_t, t, ε_∅t + w (ε_c − ε_∅t))‖²      (Adam, `inner_steps` steps at
                                                                            lr·(1 − i/100), stopped below
                                                                            tolerance + 2e-5·i, as the paper)
        z̄_{t−1} = DDIM(z̄_t, t, ...) with that ∅_t,   and ∅_{t−1} starts from ∅_t.

    Returns the pivot z*_T and the ∅_t's; `redraw` samples with them. One picture, one prompt."""
    check_pipe(pipe)
    check_prompt("prompt", prompt)
    check_steps(num_inference_steps)
    check_guidance(guidance_scale)
    if guidance_scale <= 1.0:
        raise ValueError(f"null-text inversion tunes the unconditional branch of guidance: guidance_scale must be "
                         f"above 1, got {guidance_scale!r} (at 1, `invert` alone redraws the picture)")
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be a whole number of at least 1, got {inner_steps!r}")
    for name, v in (("lr", lr), ("tolerance", tolerance)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
            raise ValueError(f"{name} must be a finite number above 0, got {v!r}")
    generator = seeded(seed, generator)
    x = image_tensor(image)
    if len(x) != 1:
        raise ValueError(f"null-text inversion takes one picture, got {len(x)}")
    kind = pipe.scheduler.prediction_type
    schedule = samplers.make_schedule("ddim", num_inference_steps, pipe.scheduler)
    with torch.inference_mode():
        cond = pipe.encode_text([prompt])
        null = pipe.encode_text([""])
        z0 = posterior(pipe, x, generator)
        check = dn.FiniteCheck(pipe.nan_check, schedule.timesteps)
        model = build_denoiser(pipe, cond, None, 1.0, schedule, Start(z0), None, x.shape[-2:], check)
        pivots: list[Tensor] = []
        ddim_invert(model, z0, schedule, kind, pivots)
        check.flush()
    pivots, cond, null = [p.clone() for p in pivots], cond.clone(), null.clone()  # out of inference mode, for autograd
    acp, unet = schedule.alphas_cumprod, pipe.unet
    z, u = pivots[-1].float(), null.float()  # z̄_t, ∅_t (fp32; cast to the U-Net's dtype for each call)
    nulls, losses = [], []
    for i, t in enumerate(schedule.timesteps):
        a_t = acp[int(t)].item()
        a_prev = acp[int(t) - schedule.step_ratio].item() if int(t) - schedule.step_ratio >= 0 else schedule.final_alpha
        target = pivots[-(i + 2)]
        tt = t.reshape(1).to(pipe.device)
        zin = z.to(unet.dtype)
        with torch.no_grad():
            out_c = unet(zin, tt, cond).float()
        u = u.detach().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr * (1 - i / 100))
        for _ in range(inner_steps):
            out_u = unet(zin, tt, u.to(unet.dtype)).float()
            loss = torch.nn.functional.mse_loss(ddim_step(out_u + guidance_scale * (out_c - out_u), z, a_t, a_prev,
                                                          kind), target.float())
            (u.grad,) = torch.autograd.grad(loss, u)  # ∅_t's gradient only: the network's weights get none
            opt.step()
            if loss.item() < tolerance + 2e-5 * i:
                break
        with torch.no_grad():
            out_u = unet(zin, tt, u.to(unet.dtype)).float()
            z = ddim_step(out_u + guidance_scale * (out_c - out_u), z, a_t, a_prev, kind)
            losses.append(torch.nn.functional.mse_loss(z, target.float()).item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"null-text inversion diverged at step {i} (t = {int(t)}): lower lr ({lr!r})")
        nulls.append(u.detach().clone())
    return NullTextInversion(pivots[-1], torch.stack(nulls), prompt, float(guidance_scale), losses)


@torch.inference_mode()
def redraw(pipe: StableDiffusion, inversion: NullTextInversion, prompt: str | list[str] | None = None,
           output_type: str = "pt", callback=None):
    """DDIM from `inversion.latents`, guided at its scale with step i's unconditional embedding
    `inversion.null_embeddings[i]`: the picture again (`prompt` None), or with other prompts, one picture each
    from the same z_T (the batch [∅_t, ∅_t, ..., c_1, c_2, ...], as `pipe` guides). `callback(i, t, latents)`
    after each step. Returns (B, 3, H, W) in [0, 1], or a list of PIL images."""
    prompts = [inversion.prompt] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
    for p in prompts:
        check_prompt("prompt", p)
    if output_type not in ("pil", "pt"):
        raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
    schedule = samplers.make_schedule("ddim", len(inversion.null_embeddings), pipe.scheduler)
    cond, B = pipe.encode_text(prompts), len(prompts)
    index = {int(t): i for i, t in enumerate(schedule.timesteps)}
    w = inversion.guidance_scale

    def eps(z: Tensor, t) -> Tensor:
        tt = torch.as_tensor(t).reshape(1).to(pipe.device)
        null = inversion.null_embeddings[index[int(t)]].to(pipe.device, pipe.unet.dtype).expand(B, -1, -1)
        zz = torch.cat([z, z]).to(pipe.unet.dtype)
        out_u, out_c = pipe.unet(zz, tt.expand(2 * B), torch.cat([null, cond])).float().chunk(2)
        return out_u + w * (out_c - out_u)

    kind = pipe.scheduler.prediction_type
    a = lambda t: schedule.alphas_cumprod[int(t)].item()  # noqa: E731
    as_eps = (lambda z, t: dn.to_eps(eps(z, t), z.float(), a(t), kind)) if kind != "epsilon" else eps  # noqa: E731
    after = None if callback is None else (lambda i, t, z, x0: callback(i, t, z))  # noqa: E731
    z = samplers.sample_ddim(as_eps, inversion.latents.float().repeat(B, 1, 1, 1), schedule, callback=after)
    images = decode_latents(pipe, z.to(pipe.dtype)).float().cpu()
    return to_pil(images) if output_type == "pil" else images


# ─── 3. prompt-to-prompt ───────────────────────────────────────────────────────────────────────────

@dataclass
class WordSwap:
    """Prompt-to-prompt's word swap over a batch of (source, target) pairs, rows [s, t, s, t, …] (after the
    unconditional half, under guidance: only the conditional rows are edited, as in Hertz et al.'s code).

    For steps i < cross_steps the target's cross-attention maps M* = softmax(Q* K*ᵀ/√d) become the source's
    M (tokens aligned 1:1), for i < self_steps its self-attention maps too (layers of at most
    SELF_REPLACE_MAX_TOKENS queries). The values V* still come from the target's prompt: the swapped
    word's value is read exactly where the source's word was looked at, so it lands on the same object."""

    cross_steps: int
    self_steps: int
    guided: bool          # the batch is [unconditional half, conditional half]
    step: int = 0         # the sampler step now running (`step_done` advances it)

    def __call__(self, probs: Tensor, is_cross: bool) -> Tensor:
        """probs (B, nh, L, S) -> the same, the target rows replaced while the step is in the share."""
        if self.step >= (self.cross_steps if is_cross else self.self_steps):
            return probs
        if not is_cross and probs.shape[-2] > SELF_REPLACE_MAX_TOKENS:
            return probs
        first = len(probs) // 2 if self.guided else 0
        probs = probs.clone()
        probs[first + 1::2] = probs[first::2]  # target rows <- their source rows
        return probs

    def step_done(self, i: int, t: Tensor, latents: Tensor) -> None:
        """The sampler's callback after step i."""
        self.step = i + 1


class EditedAttention(nn.Module):
    """An `Attention` whose attention matrix passes through `controller(probs, is_cross)` before it
    weighs the values: the module's own projections, the naive path (the matrix must exist)."""

    def __init__(self, attention: Attention, controller):
        super().__init__()
        self.attention, self.controller = attention, controller

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        a = self.attention
        B, L, _ = x.shape
        q, k, v = a.project(x, context)                                                # (B, L or S, C)
        nh = a.heads
        q, k, v = (y.reshape(B, -1, nh, y.shape[-1] // nh).transpose(1, 2) for y in (q, k, v))  # (B, nh, ·, hd)
        probs = self.controller(attention_probs(q, k, upcast=a.upcast), a.is_cross)   # (B, nh, L, S)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, L, -1)               # (B, L, C)
        return a.to_out[0](out)


@contextlib.contextmanager
def attention_editing(unet: nn.Module, controller) -> Iterator[None]:
    """`EditedAttention` in place of every attn1/attn2 of `unet` while the block runs; the original modules
    are put back afterwards, whatever happens."""
    swapped = []
    for parent in list(unet.modules()):
        for name in ("attn1", "attn2"):
            child = getattr(parent, name, None)
            if isinstance(child, Attention):
                swapped.append((parent, name, child))
    try:
        for parent, name, child in swapped:
            setattr(parent, name, EditedAttention(child, controller))
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def token_count(pipe: StableDiffusion, prompt: str) -> int:
    """The prompt's tokens, BOS and EOS not counted (the first EOS ends the prompt; the rest is padding)."""
    ids = pipe.tokenizer([prompt])[0]
    return int((ids == pipe.tokenizer.eos_id).nonzero()[0, 0]) - 1


def edit(pipe: StableDiffusion, image, prompt: str, target_prompt: str, num_inference_steps: int = 50,
         seed: int | None = 0, cross_replace: float = 0.8, self_replace: float = 0.4, guidance_scale: float = 7.5,
         generator: torch.Generator | None = None, output_type: str = "pil", null_text: bool = False):
    """The picture redrawn with `target_prompt` (a list of one PIL image, or (1, 3, H, W) in [0, 1]).

    `image` is inverted with `prompt` (DDIM at guidance 1, `invert`); then `prompt` and `target_prompt`
    are sampled with DDIM as one batch from that z_T, the target's cross-attention maps replaced by the
    source's for the first int(cross_replace · steps) steps and its self-attention maps for the first
    int(self_replace · steps) (`WordSwap`; Hertz et al.'s defaults 0.8 and 0.4). The prompts must have the same number of tokens (a word swap,
    "a red circle" -> "a blue circle"). `seed`: the draw z ~ q(z|x) of the inversion (None: its mean).

    Guidance: the inversion runs at guidance 1, and sampling at guidance_scale w > 1 from its z_T does not
    redraw the picture exactly (each guided step differs from the unguided step the inversion undid).
    `null_text_inversion` (Mokady et al. 2023) closes that gap for redrawing by tuning the unconditional
    embedding per step: `null_text=True` inverts so (Mokady et al.'s own use of it, with prompt-to-prompt), at
    the cost of its optimisation. Otherwise guidance_scale 1 keeps the picture most faithfully, larger scales
    edit more strongly and drift more: the user chooses."""
    check_pipe(pipe)
    for name, p in (("prompt", prompt), ("target_prompt", target_prompt)):
        check_prompt(name, p)
    check_steps(num_inference_steps)
    check_share("cross_replace", cross_replace)
    check_share("self_replace", self_replace)
    check_guidance(guidance_scale)
    if output_type not in ("pil", "pt"):
        raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
    n, m = token_count(pipe, prompt), token_count(pipe, target_prompt)
    if n != m:
        raise ValueError(f"a word swap aligns the prompts token by token: prompt has {n} tokens, target_prompt {m}")
    if null_text not in (True, False):
        raise ValueError(f"null_text must be True or False, got {null_text!r}")
    if null_text:
        inversion = null_text_inversion(pipe, image, prompt, num_inference_steps, guidance_scale, seed=seed,
                                        generator=generator)
        controller = WordSwap(int(cross_replace * num_inference_steps), int(self_replace * num_inference_steps),
                              guided=True)
        with attention_editing(pipe.unet, controller):
            return redraw(pipe, inversion, [prompt, target_prompt], output_type, controller.step_done)[1:]
    z_T = invert(pipe, image, prompt, num_inference_steps, 1.0, seed, generator)
    if len(z_T) != 1:
        raise ValueError(f"edit takes one picture, got {len(z_T)}")
    controller = WordSwap(int(cross_replace * num_inference_steps), int(self_replace * num_inference_steps),
                          guided=guidance_scale > 1.0)
    H, W = (s * pipe.vae.config.downsampling for s in z_T.shape[-2:])
    with attention_editing(pipe.unet, controller):
        images = generate(pipe, [prompt, target_prompt], num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, height=H, width=W, sampler="ddim",
                          latents=z_T.repeat(2, 1, 1, 1), callback=controller.step_done, output_type=output_type)
    return images[1:]


# ─── 4. guidance by a loss ─────────────────────────────────────────────────────────────────────────

Loss = Callable[[Tensor], Tensor]  # pictures (B, 3, H, W), about [0, 1] -> a scalar to make smaller


def check_loss_value(loss) -> Tensor:
    """The loss function's answer: one finite number that depends on the picture."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {got}")
    if not loss.requires_grad:
        raise ValueError("loss_fn's result does not depend on the picture (no gradient): compute it from its input")
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(f"loss_fn returned {loss.item()}; expected a finite number")
    return loss.reshape(())


def loss_gradient(loss_fn: Loss, decode: Callable[[Tensor], Tensor], x0_hat: Tensor) -> tuple[Tensor, float]:
    """∇_{ẑ₀} ℓ(D(ẑ₀)) (B, 4, h, w) and ℓ's value, by one backward pass through the decoder."""
    with torch.enable_grad():
        z0 = x0_hat.detach().clone().requires_grad_()
        loss = check_loss_value(loss_fn(decode(z0)))
        (grad,) = torch.autograd.grad(loss, z0)
    return grad, loss.item()


def with_loss(model: dn.Guided, loss_fn: Loss, scale: float, decode: Callable[[Tensor], Tensor],
              alphas_cumprod: Tensor, prediction_type: str = "epsilon", losses: list | None = None) -> dn.Guided:
    """(z_t, t) -> the guided network output, as (z_t, t) -> ε̃ of eq. 16.7 (sample it as an ε model).
    `losses`: if given, ℓ(D(ẑ₀)) of each step is appended to it.

    Classifier guidance (Dhariwal & Nichol 2021, §4.1) samples p(z | y) ∝ p(z) p(y | z) by adding the gradient of a
    classifier's log-likelihood to the model's score. Any differentiable loss ℓ of the picture can play the
    classifier's part, log p(y | z_t) ≈ −s·ℓ(D(ẑ₀(z_t))) with D the VAE decoder (Bansal et al. 2023, "Universal
    Guidance for Diffusion Models", forward guidance; the colour loss of Hugging Face's diffusion course, unit 2).
    With ε̂ = −√(1−ᾱ_t) ∇ log p_t(z_t) (notebook 02) the guided prediction is

        ε̃ = ε̂ + s √(1−ᾱ_t) ∇_{z_t} ℓ(D(ẑ₀)),          ẑ₀ = (z_t − √(1−ᾱ_t) ε̂) / √ᾱ_t               (16.6)

    The gradient is taken with ε̂ held fixed, as the course does: no backward pass through the U-Net, only through
    the decoder. Then ∇_{z_t} ẑ₀ = 1/√ᾱ_t and

        ε̃ = ε̂ + s √((1−ᾱ_t)/ᾱ_t) ∇_{ẑ₀} ℓ(D(ẑ₀))                                                 (16.7)

    This is that step as a denoiser wrapper around the guided network (it composes with classifier-free
    guidance, which runs inside it); `guided` is text-to-image with it, built as `generate.generate` builds its
    denoiser and sampler.
    """
    def eps(z: Tensor, t: Tensor) -> Tensor:
        a = alphas_cumprod[int(t)].item()
        with torch.no_grad():
            out = model(z, t)
        e, x0_hat = dn.to_eps(out, z, a, prediction_type), dn.to_x0(out, z, a, prediction_type)
        grad, value = loss_gradient(loss_fn, decode, x0_hat)
        if losses is not None:
            losses.append(value)
        return e + scale * ((1 - a) / a) ** 0.5 * grad.to(e.dtype)
    return eps


def check_guided_arguments(pipe: StableDiffusion, loss_fn, loss_scale, sampler: str) -> None:
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be a function of the pictures (B, 3, H, W) returning a scalar, "
                         f"got {type(loss_fn).__name__}")
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not math.isfinite(loss_scale) \
            or loss_scale < 0:
        raise ValueError(f"loss_scale must be a finite number >= 0, got {loss_scale!r}")
    if pipe.family != "sd1" or pipe.scheduler.prediction_type == "flow":
        raise ValueError(f"loss guidance runs SD 1.x/2.x pipelines on the ᾱ schedule, not family {pipe.family!r} "
                         f"predicting {pipe.scheduler.prediction_type!r}")
    if samplers.get_sampler(sampler).kind != "discrete":
        raise ValueError(f"loss guidance runs the discrete-time samplers (it needs ᾱ_t at integer t), "
                         f"not {sampler!r}")


def guided(pipe: StableDiffusion, prompt: str | list[str], loss_fn: Loss, loss_scale: float, *,
           num_inference_steps: int = 25, guidance_scale: float = 7.5, seed: int | None = 0,
           generator: torch.Generator | None = None, latents: Tensor | None = None, sampler: str = "ddim",
           output_type: str = "pil", losses: list | None = None):
    """Text-to-image steered by `loss_fn` (eq. 16.7): pictures of `prompt` that `loss_fn` scores low.

    loss_fn(x) -> scalar tensor: x is the decoded prediction of the clean picture, (B, 3, H, W) in [0, 1]
    (not clamped, so that every pixel passes a gradient); a sum over the batch keeps each picture's pull
    independent of the batch size. loss_scale s: 0 is plain sampling; its useful size depends on the loss (for
    a mean over the pixels of a [0, 1] picture, the tiny model wants about 300 to 3,000). `losses` collects ℓ
    of each step."""
    check_guided_arguments(pipe, loss_fn, loss_scale, sampler)
    size = pipe.image_size
    check_arguments(sampler, output_type, num_inference_steps, size, size, 1.0, guidance_scale, 0.0, False, False,
                    False)
    generator = seeded(seed, generator)
    with torch.no_grad():
        cond, uncond = encode(pipe, prompt, None, guidance_scale, 1, 0)
    schedule = samplers.make_schedule(sampler, num_inference_steps, pipe.scheduler)
    f = pipe.vae.config.downsampling
    start = txt2img_start(pipe, schedule, (cond.shape[0], pipe.unet.config.out_channels, size // f, size // f),
                          latents, generator)
    check = dn.FiniteCheck(pipe.nan_check, schedule.timesteps)
    net = build_denoiser(pipe, cond, uncond, guidance_scale, schedule, start, None, (size, size), check)

    def decode(z0: Tensor) -> Tensor:  # ẑ₀ (B, 4, h, w) -> pictures (B, 3, H, W), about [0, 1]
        return (pipe.vae.decode(z0 / pipe.vae.scaling_factor).float() + 1) / 2

    model = with_loss(net, loss_fn, float(loss_scale), decode, schedule.alphas_cumprod, pipe.scheduler.prediction_type,
                      losses)
    with torch.no_grad():
        z = samplers.run(sampler, model, start.z, schedule, prediction_type="epsilon", generator=generator)
        check.flush()
        if output_type == "latent":
            return z
        images = decode_latents(pipe, z)
    return images if output_type == "pt" else to_pil(images)
