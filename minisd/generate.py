"""The generation loop: text-to-image, image-to-image and inpainting, as a short list of steps.

    1. check the arguments
    2. encode the prompt (and the negative prompt, for classifier-free guidance)
    3. the schedule, and where on it to start (img2img and inpainting start part-way)
    4. the initial latents: pure noise z_T (txt2img), or the image's latents noised to the first step
    5. the denoiser, built from wrappers (`diffusion.denoisers`): U-Net, extra channels, ControlNet, CFG, ε
       (an LCM-distilled U-Net reads the guidance scale as an input instead: one pass per step, no CFG)
    6. the sampler calls it once (or twice) per step
    7. decode: x = vae.decode(z_0 / scaling_factor), mapped from [-1, 1] to [0, 1]

The random draws happen in the order diffusers' pipelines make them (posterior sample, then the
noise), so the same generator gives the same image.

Videos (`generate_video`, AnimateDiff) take the same steps with latents (B, C, F, h, w): F frames per video,
drawn in one piece, denoised by a video U-Net that sees all the frames of a video at once, decoded frame by frame.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .adapters.controlnet import ControlOptions, control_function
from .diffusion import denoisers as dn
from .diffusion import samplers
from .images import ImageInput, image_to_tensor, mask_to_tensor, to_pil

if TYPE_CHECKING:
    from .models.motion import VideoUNet
    from .pipeline import StableDiffusion

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs
MASKED_CONTENT = ("fill", "original")  # what inpainting noises inside the mask: AUTOMATIC1111's "masked content"
DIFFUSERS_INPAINT = dict(strength=1.0, keep_unmasked=False, masked_content="original")  # StableDiffusionInpaintPipeline


@torch.inference_mode()
def generate(pipe: StableDiffusion, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
             num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
             width: int | None = None, sampler: str | None = None, karras: bool = False, eta: float = 0.0,
             seed: int | None = None, generator: torch.Generator | None = None, latents: Tensor | None = None,
             num_images_per_prompt: int = 1, callback=None, output_type: str = "pil", clip_skip: int = 0,
             image: ImageInput | None = None, strength: float = 1.0, mask_image: ImageInput | None = None,
             keep_unmasked: bool = False, masked_content: str = "original", mask_blur: float = 0.0,
             control: ControlOptions | None = None,
             encoded: tuple[Tensor, Tensor | None] | None = None, added: dict[str, Tensor] | None = None,
             denoising_start: float | None = None, denoising_end: float | None = None, upcast_vae: bool = False,
             guidance_rescale: float = 0.0):
    """See `StableDiffusion.__call__`, `.img2img` and `.inpaint`. A family whose backbone reads more than the
    context (SDXL, `pipeline_xl`) passes its prompt `encoded` as (cond, uncond) and the `added` conditions
    (see `denoisers.unet_backbone`); `denoising_end`/`denoising_start` split one schedule between two models
    (see `split_schedule`); `upcast_vae` decodes in float32 whatever the VAE's dtype."""
    distilled = embedded_guidance_dim(pipe) is not None
    if sampler is None:  # an LCM U-Net samples with its own sampler, as LatentConsistencyModelPipeline does
        sampler = "lcm" if distilled else samplers.default_sampler(pipe.scheduler.prediction_type)
    x_image = image_to_tensor(image, height, width) if image is not None else None
    if x_image is not None:
        height, width = x_image.shape[-2:]
    height = pipe.image_size if height is None else height  # 0 is an impossible size, not "the default"
    width = pipe.image_size if width is None else width
    check_arguments(sampler, output_type, num_inference_steps, height, width, strength, guidance_scale, eta,
                    mask_image is not None, x_image is not None, keep_unmasked)
    check_inpaint_options(masked_content, mask_blur)
    _number("guidance_rescale", guidance_rescale, 0.0, "a finite number in [0, 1]")
    if guidance_rescale > 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    generator = seeded(seed, generator)
    if distilled:
        check_distilled_guidance(negative_prompt, guidance_rescale, encoded)

    cond, uncond = encoded if encoded is not None else \
        encode(pipe, prompt, negative_prompt, 1.0 if distilled else guidance_scale, num_images_per_prompt, clip_skip)
    schedule = start_schedule(pipe, sampler, num_inference_steps, karras, strength if x_image is not None else None)
    schedule = split_schedule(schedule, pipe.scheduler.num_train_timesteps, denoising_start, denoising_end)
    f = pipe.vae.config.downsampling
    shape = (cond.shape[0], pipe.unet.config.out_channels, height // f, width // f)
    if denoising_start is not None:
        start = handoff_start(pipe, shape, latents)
    elif x_image is None:
        start = txt2img_start(pipe, schedule, shape, latents, generator)
    elif mask_image is None:
        start = img2img_start(pipe, sampler, schedule, shape, x_image, generator)
    else:
        start = inpaint_start(pipe, sampler, schedule, shape, x_image, mask_image, strength, latents, generator,
                              masked_content)

    check = dn.FiniteCheck(pipe.nan_check, schedule.timesteps)
    denoiser = build_denoiser(pipe, cond, uncond, guidance_scale, schedule, start, control, (height, width), check,
                              added, guidance_rescale)
    z = sample(pipe, sampler, denoiser, start, schedule, eta, generator, callback)
    check.flush()

    if output_type == "latent":
        return z
    images = decode_latents(pipe, z, upcast_vae)
    if keep_unmasked:  # the VAE's round trip changes every pixel a little: paste the original back outside the mask
        images = paste_back(images, x_image, start.mask, mask_blur)
    return images if output_type == "pt" else to_pil(images)


@torch.inference_mode()
def generate_video(pipe: StableDiffusion, video_unet: VideoUNet, prompt: str | list[str], *, num_frames: int = 8,
                   negative_prompt: str | list[str] | None = None, num_inference_steps: int = 50,
                   guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                   sampler: str | None = None, karras: bool = False, eta: float = 0.0, seed: int | None = None,
                   generator: torch.Generator | None = None, latents: Tensor | None = None,
                   num_videos_per_prompt: int = 1, callback=None, output_type: str = "pil", clip_skip: int = 0,
                   decode_chunk_size: int = 16):
    """See `StableDiffusion.video`: the steps of `generate` over videos, as diffusers' AnimateDiffPipeline takes
    them. The latents are (B, C, F, h, w), drawn in one piece; the samplers walk them as they walk pictures, the
    video U-Net sees all F frames of a video at once, and each video's text reaches every one of its frames. The
    frames are decoded as pictures."""
    if embedded_guidance_dim(pipe) is not None:
        raise ValueError("this U-Net is LCM-distilled (guidance built in); videos take a U-Net sampled with "
                         "classifier-free guidance")
    sampler = samplers.default_sampler(pipe.scheduler.prediction_type) if sampler is None else sampler
    height = pipe.image_size if height is None else height
    width = pipe.image_size if width is None else width
    check_arguments(sampler, output_type, num_inference_steps, height, width, 1.0, guidance_scale, eta,
                    False, False, False)
    check_frames(num_frames, video_unet.adapter.config.max_seq_length)
    if isinstance(decode_chunk_size, bool) or not isinstance(decode_chunk_size, int) or decode_chunk_size < 1:
        raise ValueError(f"decode_chunk_size must be a whole number >= 1, got {decode_chunk_size!r}")
    generator = seeded(seed, generator)

    cond, uncond = encode(pipe, prompt, negative_prompt, guidance_scale, num_videos_per_prompt, clip_skip)
    schedule = start_schedule(pipe, sampler, num_inference_steps, karras, None)
    f = pipe.vae.config.downsampling
    shape = (cond.shape[0], pipe.unet.config.out_channels, num_frames, height // f, width // f)  # (B, C, F, h, w)
    start = txt2img_start(pipe, schedule, shape, latents, generator)
    check = dn.FiniteCheck(pipe.nan_check, schedule.timesteps)
    net = check.net(video_backbone(video_unet, schedule.timesteps, cond.device), "video U-Net")
    z = sample(pipe, sampler, dn.with_cfg(net, cond, uncond, guidance_scale), start, schedule, eta, generator,
               callback)
    check.flush()

    if output_type == "latent":
        return z
    video = decode_video(pipe, z, decode_chunk_size)  # (B, F, 3, H, W)
    return video if output_type == "pt" else [to_pil(frames) for frames in video]


# ─── 1. arguments ──────────────────────────────────────────────────────────────────────────────────

def _number(name: str, value, lo: float, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < lo:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_arguments(sampler: str, output_type: str, steps: int, height: int, width: int, strength: float,
                    guidance_scale: float, eta: float, has_mask: bool, has_image: bool, keep_unmasked: bool) -> None:
    """Every bad argument fails here, before any network runs."""
    samplers.get_sampler(sampler)
    if output_type not in ("pil", "pt", "latent"):
        raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
    _number("strength", strength, 0.0, "a finite number in [0, 1]")
    if strength > 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    _number("guidance_scale", guidance_scale, 0.0, "a finite number >= 0")
    _number("eta", eta, 0.0, "a finite number >= 0")
    if has_mask and not has_image:
        raise ValueError("inpainting needs an image as well as a mask_image")
    if keep_unmasked and not has_mask:
        raise ValueError("keep_unmasked pastes the image back outside the mask: it needs a mask_image")


def seeded(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    """The generator to draw from: `generator`, else a CPU one seeded with `seed` (checked), else None."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if generator is None and seed is not None:
        generator = torch.Generator("cpu").manual_seed(seed)
    return generator


def embedded_guidance_dim(pipe: StableDiffusion) -> int | None:
    """W, the width of the guidance-scale embedding an LCM-distilled U-Net reads; None for any other backbone."""
    return getattr(pipe.unet.config, "time_cond_proj_dim", None)


def check_distilled_guidance(negative_prompt, guidance_rescale: float, encoded) -> None:
    """An LCM U-Net has guidance built in: there is no unconditional branch for a negative prompt to replace,
    nor a guided output to rescale (diffusers' LatentConsistencyModelPipeline takes neither)."""
    if negative_prompt is not None:
        raise ValueError("this U-Net is LCM-distilled: guidance is built into it (one pass per step, no "
                         "unconditional branch), so a negative_prompt has nothing to replace; leave it out")
    if guidance_rescale:
        raise ValueError(f"guidance_rescale={guidance_rescale} rescales classifier-free guidance, which an "
                         f"LCM-distilled U-Net does not run; leave it at 0")
    if encoded is not None and encoded[1] is not None:
        raise ValueError("an LCM-distilled U-Net runs the conditional branch alone: pass encoded=(cond, None)")


def check_inpaint_options(masked_content: str, mask_blur: float) -> None:
    if masked_content not in MASKED_CONTENT:
        raise ValueError(f"masked_content must be one of {', '.join(map(repr, MASKED_CONTENT))}, got {masked_content!r}")
    _number("mask_blur", mask_blur, 0.0, "a finite number of pixels >= 0")


# ─── 2. the prompt ─────────────────────────────────────────────────────────────────────────────────

def encode(pipe: StableDiffusion, prompt, negative_prompt, guidance_scale: float, num_images_per_prompt: int,
           clip_skip: int) -> tuple[Tensor, Tensor | None]:
    """(cond, uncond) text embeddings, checked for NaN/inf (uncond None: no guidance)."""
    cond, uncond = pipe.encode_prompt(prompt, negative_prompt, guidance_scale, num_images_per_prompt, clip_skip)
    for x in (cond, uncond):
        if x is not None:
            dn.check_finite(x, "text encoder", pipe.nan_check)
    return cond, uncond


# ─── 3. the schedule ───────────────────────────────────────────────────────────────────────────────

def start_schedule(pipe: StableDiffusion, sampler: str, steps: int, karras: bool,
                   strength: float | None) -> samplers.Schedule:
    """The sampler's schedule; with an image (strength given), from step (1 − strength)·steps on:
    strength 1 runs every step, 0.3 only the last 30%."""
    schedule = samplers.make_schedule(sampler, steps, pipe.scheduler, karras)
    if strength is None:
        return schedule
    init_steps = min(int(steps * strength), steps)
    if init_steps < 1:
        raise ValueError(f"strength {strength} with {steps} steps leaves no step to run; "
                         f"raise strength or num_inference_steps")
    return samplers.truncate(schedule, steps - init_steps)


def _fraction(name: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")


def split_schedule(schedule: samplers.Schedule, N: int, start: float | None, end: float | None) -> samplers.Schedule:
    """One schedule shared by two models (SDXL's base and refiner, Podell et al. 2023, §2.5), cut at the
    training timestep t_cut = round((1 − fraction)·N) as diffusers cuts it: `end` keeps the steps with
    t ≥ t_cut (the base; its latents come out part-way, still noisy), `start` the steps with t < t_cut
    (the refiner, which takes those latents as they are)."""
    _fraction("denoising_start", start)
    _fraction("denoising_end", end)
    t = schedule.timesteps
    if end is not None:
        n = int((t >= int(round(N - end * N))).sum())
        sigmas = schedule.sigmas[:n + 1] if schedule.sigmas is not None else None  # σ after the last step kept
        schedule = samplers.Schedule(t[:n], sigmas, schedule.alphas_cumprod, schedule.step_ratio,
                                     schedule.init_sigma, schedule.final_alpha)
    if start is not None:
        schedule = samplers.truncate(schedule, len(schedule.timesteps) - int((t < int(round(N - start * N))).sum()))
    if len(schedule.timesteps) == 0:
        raise ValueError(f"denoising_start={start} and denoising_end={end} leave no step of {len(t)} to run")
    return schedule


# ─── 4. the initial latents ────────────────────────────────────────────────────────────────────────

@dataclass
class Start:
    """Where sampling starts, and what inpainting adds to it."""

    z: Tensor                             # the initial latents, in the sampler's space
    extra: Tensor | None = None           # a 9-channel U-Net's mask and masked-image latents (B, 5, h, w)
    blend: Callable | None = None         # a standard U-Net's inpainting: the sampler callback that pastes back
    mask: Tensor | None = None            # (n, 1, H, W) pixel mask, for keep_unmasked


def txt2img_start(pipe: StableDiffusion, schedule: samplers.Schedule, shape: tuple[int, ...],
                  latents: Tensor | None, generator: torch.Generator | None) -> Start:
    """Pure noise, scaled to the sampler's initial σ (or the given `latents`, the same way)."""
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    if latents is None:
        return Start(randn(shape, generator, pipe.device, pipe.dtype) * schedule.init_sigma)
    return Start(latents.to(pipe.device, pipe.dtype) * schedule.init_sigma)


def handoff_start(pipe: StableDiffusion, shape: tuple[int, ...], latents: Tensor | None) -> Start:
    """The latents another model left part-way (its output_type="latent" with denoising_end), taken as
    they are: they are already in the sampler's space at the first step kept."""
    if latents is None or tuple(latents.shape) != shape:
        got = None if latents is None else tuple(latents.shape)
        raise ValueError(f"denoising_start continues from latents of shape {shape} (the output_type='latent' of "
                         f"a run with denoising_end), got {got}")
    return Start(latents.to(pipe.device, pipe.dtype))


def img2img_start(pipe: StableDiffusion, sampler: str, schedule: samplers.Schedule, shape: tuple[int, ...],
                  x_image: Tensor, generator: torch.Generator | None) -> Start:
    """The image's latents, noised to the first step."""
    z0 = per_picture(encode_image(pipe, x_image, generator), shape[0], "image")
    noise = randn(shape, generator, pipe.device, pipe.dtype)
    return Start(samplers.add_noise(sampler, z0, noise, schedule, 0))


def inpaint_start(pipe: StableDiffusion, sampler: str, schedule: samplers.Schedule, shape: tuple[int, ...],
                  x_image: Tensor, mask_image: ImageInput, strength: float, latents: Tensor | None,
                  generator: torch.Generator | None, masked_content: str = "original") -> Start:
    """A 9-channel inpainting U-Net sees the mask and the masked image's latents as extra channels; a
    standard U-Net gets the (noised) known latents pasted back outside the mask after each step.
    masked_content "fill": the latents noised (strength < 1) and pasted back are those of the picture with
    the masked area filled from its surroundings (`fill_masked`), so the repainted area starts from the
    picture's background, not from what it repaints; "original": those of the picture itself (diffusers)."""
    B, h, w = shape[0], shape[2], shape[3]
    device, dtype = pipe.device, pipe.dtype
    in_channels = pipe.unet.config.in_channels
    if in_channels not in (4, 9):
        raise ValueError(f"inpainting needs a 4- or 9-channel U-Net, not {in_channels}")
    mask = mask_to_tensor(mask_image, *x_image.shape[-2:])
    if len(mask) != len(x_image) and 1 not in (len(mask), len(x_image)):
        raise ValueError(f"{len(x_image)} images and {len(mask)} masks: give as many masks as images, or one of either")
    masked = x_image * (mask < 0.5)
    nine_channels = in_channels == 9
    x_start = fill_masked(x_image, mask) if masked_content == "fill" else x_image
    z0 = per_picture(encode_image(pipe, x_start, generator), B, "image") if not nine_channels or strength < 1.0 else None
    noise = latents.to(device, dtype) if latents is not None else randn(shape, generator, device, dtype)
    z = noise * schedule.init_sigma if strength >= 1.0 else samplers.add_noise(sampler, z0, noise, schedule, 0)
    mask_latent = per_picture(F.interpolate(mask, size=(h, w)).to(device, dtype), B, "mask_image")
    masked_latents = encode_image(pipe, masked, generator)  # a standard U-Net does not use it: diffusers draws it too
    if nine_channels:
        extra = torch.cat([mask_latent, per_picture(masked_latents, B, "masked image")], dim=1)
        return Start(z, extra=extra, mask=mask)

    def blend(i: int, t: Tensor, latents: Tensor, x0_hat: Tensor) -> Tensor:
        last = i + 1 >= len(schedule.timesteps)
        known = z0 if last else samplers.add_noise(sampler, z0, noise, schedule, i + 1)
        return (1 - mask_latent) * known + mask_latent * latents

    return Start(z, blend=blend, mask=mask)


def fill_masked(x: Tensor, mask: Tensor) -> Tensor:
    """The pictures x (n, 3, H, W) with the area where mask (n or 1, 1, H, W) is white replaced by the colours
    around it (AUTOMATIC1111's "masked content: fill"). A pixel of the area takes the mean of the known pixels
    in the finest cell of a 1×1, 2×2, 4×4, … grid (bilinearly spread) holding enough of them: the nearest
    surroundings' colour; gray (0) where nothing is known."""
    known = (mask < 0.5).to(x.dtype)
    H, W = x.shape[-2:]
    filled = torch.zeros_like(x * known)
    cells = 1
    while cells <= min(H, W):
        weight, total = (F.interpolate(F.adaptive_avg_pool2d(a, cells), size=(H, W), mode="bilinear")
                         for a in (known, x * known))
        filled = torch.where(weight > 0.05, total / weight.clamp_min(1e-6), filled)  # 5%: enough known pixels
        cells *= 2
    return known * x + (1 - known) * filled


def feather(mask: Tensor, sigma: float) -> Tensor:
    """The (n, 1, H, W) mask blurred by a Gaussian of `sigma` px (0: as it is), so that a seam does not show."""
    if sigma <= 0:
        return mask
    r = math.ceil(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=mask.dtype, device=mask.device) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    m = F.conv2d(F.pad(mask, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def paste_back(images: Tensor, x_image: Tensor, mask: Tensor, mask_blur: float) -> Tensor:
    """The original pixels outside the mask over the decoded images (B, 3, H, W) in [0, 1], across a seam
    feathered by `mask_blur` px, as AUTOMATIC1111 does."""
    B = len(images)
    m = feather(per_picture(mask, B, "mask_image").to(images.device, images.dtype), mask_blur)
    return m * images + (1 - m) * (per_picture(x_image, B, "image").to(images.device, images.dtype) / 2 + 0.5)


# ─── 5. the denoiser ───────────────────────────────────────────────────────────────────────────────

def build_denoiser(pipe: StableDiffusion, cond: Tensor, uncond: Tensor | None, guidance_scale: float,
                   schedule: samplers.Schedule, start: Start, control: ControlOptions | None, size: tuple[int, int],
                   check: dn.FiniteCheck, added: dict[str, Tensor] | None = None,
                   guidance_rescale: float = 0.0) -> dn.Guided:
    """(z_t, t) -> the guided network output, from the wrappers of `diffusion.denoisers`, innermost first;
    the sampler turns it into ε̂ or ẑ₀ by the scheduler's prediction type. An LCM-distilled U-Net gets the
    guidance scale as an added condition (its embedding) and runs the conditional branch alone."""
    dim = embedded_guidance_dim(pipe)
    if dim is not None:
        added = {**(added or {}), **dn.guidance_condition(guidance_scale, cond.shape[0], dim, cond.device, cond.dtype)}
    net = dn.unet_backbone(pipe.unet, dn.timesteps_on_device(schedule.timesteps, cond.device), added)
    if pipe.compile_mode in CUDA_GRAPH_MODES:  # the graph's output buffer is overwritten by the next replay
        net = dn.copy_output(net)
    net = check.net(net, "U-Net")
    if start.extra is not None:
        net = dn.with_extra_channels(net, start.extra)
    if control is not None:
        sdxl = {k: v for k, v in (added or {}).items() if k in ("pooled", "time_ids")}  # not an LCM's guidance input
        residuals = control_function(pipe.controlnets, control, schedule.timesteps, cond.shape[0], uncond is not None,
                                     *size, pipe.device, pipe.dtype, added=sdxl)
        net = dn.with_controlnet(net, check.control(residuals, "ControlNet"))
    if dim is not None:
        return dn.with_embedded_guidance(net, cond)
    return dn.with_cfg(net, cond, uncond, guidance_scale, guidance_rescale)


# ─── 6. sampling ───────────────────────────────────────────────────────────────────────────────────

def sample(pipe: StableDiffusion, sampler: str, denoiser: dn.Guided, start: Start, schedule: samplers.Schedule,
           eta: float, generator: torch.Generator | None, callback) -> Tensor:
    """Run the sampler with a progress bar; after each step inpainting's blend, then the user's callback:
    callback(i, t, latents), or callback(i, t, latents, x0_hat) when it takes a fourth argument."""
    bar = _progress(len(schedule.timesteps), pipe.progress)
    with_x0 = callback is not None and takes_x0(callback)

    def on_step(i: int, t: Tensor, latents: Tensor, x0_hat: Tensor) -> Tensor | None:
        out = start.blend(i, t, latents, x0_hat) if start.blend is not None else None
        bar.update(1)
        if callback is not None:
            callback(i, t, latents if out is None else out, *((x0_hat,) if with_x0 else ()))
        return out

    try:
        return samplers.run(sampler, denoiser, start.z, schedule, prediction_type=pipe.scheduler.prediction_type,
                            eta=eta, generator=generator, callback=on_step)
    finally:
        bar.close()


def takes_x0(callback) -> bool:
    """Whether `callback` takes a fourth positional argument (the step's x̂₀), as the playground's does."""
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the three-argument form
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="sampling", leave=False)


# ─── 7. decoding, and the helpers ──────────────────────────────────────────────────────────────────

def decode_latents(pipe: StableDiffusion, z: Tensor, upcast: bool = False) -> Tensor:
    """z (B, 4, h, w) -> images (B, 3, H, W) in [0, 1]; reruns in fp32 if fp16 overflows to NaN/inf
    (the SD 1.x VAE's activations can exceed fp16's range). NaN/inf left after that: see pipe.nan_check.
    upcast: decode in fp32 from the start (SDXL's VAE, whose config says force_upcast, as diffusers does)."""
    vae = pipe.vae
    if upcast and vae.dtype != torch.float32:
        dtype = vae.dtype
        vae.float()
        try:
            return decode_latents(pipe, z.float())
        finally:
            vae.to(dtype)

    def run(z: Tensor) -> Tensor:  # pipe.enable_vae_slicing: one image at a time; tiling: tile by tile
        decode = vae.tiled_decode if pipe.vae_tiling else vae.decode
        if pipe.vae_slicing and len(z) > 1:
            return torch.cat([decode(zi[None]) for zi in z])
        return decode(z)

    x = run((z / vae.scaling_factor).to(vae.dtype))
    if vae.dtype != torch.float32 and not torch.isfinite(x).all():
        warnings.warn(f"the VAE overflowed in {vae.dtype}; decoding again in float32", stacklevel=3)
        dtype = vae.dtype
        vae.float()
        try:
            x = run(z.float() / vae.scaling_factor)
        finally:
            vae.to(dtype)
    dn.check_finite(x, "VAE decoder", pipe.nan_check)
    return (x.float() / 2 + 0.5).clamp(0, 1)


def check_frames(num_frames: int, limit: int) -> None:
    """A video has 1 to `limit` frames: the motion module's positions (its max_seq_length)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= limit:
        raise ValueError(f"num_frames must be a whole number from 1 to {limit} (the frames the motion module has "
                         f"positions for), got {num_frames!r}")


def video_backbone(video_unet: VideoUNet, timesteps: Tensor, device: torch.device) -> dn.Net:
    """The video U-Net as the innermost denoiser, as `denoisers.unet_backbone` is the image U-Net: z (B, C, F, h, w)
    in its dtype, t on its device; the context (B, T, E) has one row per video, which the video U-Net hands to each
    of its frames (as diffusers repeats it F times). There is no ControlNet for videos: `control` stays None."""
    on_device = dn.timesteps_on_device(timesteps, device)
    dtype = video_unet.unet.dtype

    def net(z: Tensor, t: Tensor, context: Tensor, control=None) -> Tensor:
        return video_unet(z.to(dtype), on_device(t), context).to(z.dtype)

    return net


def decode_video(pipe: StableDiffusion, z: Tensor, chunk: int) -> Tensor:
    """z (B, C, F, h, w) -> frames (B, F, 3, H, W) in [0, 1], decoded as pictures `chunk` frames at a time
    (diffusers' decode_chunk_size: the VAE holds `chunk` pictures at once, whatever the clip's length)."""
    B, C, num_frames, h, w = z.shape
    frames = z.transpose(1, 2).reshape(B * num_frames, C, h, w)  # (B·F, C, h, w), each video's frames in order
    x = torch.cat([decode_latents(pipe, part) for part in frames.split(chunk)])  # (B·F, 3, H, W)
    return x.reshape(B, num_frames, *x.shape[1:])


def per_picture(x: Tensor, B: int, name: str) -> Tensor:
    """Rows for the B pictures made (prompts × num_images_per_prompt) from the n given: n = B, or n divides B
    and the n repeat in turn (1 2 1 2 ..., as diffusers tiles them)."""
    n = x.shape[0]
    if B % n:
        raise ValueError(f"{n} {name}s cannot be shared out over {B} pictures (prompts × num_images_per_prompt): "
                         f"give one, or as many as the pictures, or a number that divides it")
    return x.repeat(B // n, *([1] * (x.ndim - 1)))


def encode_image(pipe: StableDiffusion, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Pixels in [-1, 1] -> scaled latents z = scaling_factor · z₀, z₀ ~ q(z₀|x) (a sample, as diffusers)."""
    posterior = pipe.vae.encode(x.to(pipe.device, pipe.vae.dtype))
    return (posterior.sample(generator) * pipe.vae.scaling_factor).to(pipe.dtype)


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
          dtype: torch.dtype) -> Tensor:
    """Noise drawn on the generator's device (CPU for seeds, so a seed gives the same image everywhere)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
