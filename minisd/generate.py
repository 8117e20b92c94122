"""The generation loop: text-to-image, image-to-image and inpainting, in one readable function.

    1. encode the prompt (and the negative prompt, for classifier-free guidance)
    2. start: pure noise z_T (txt2img), or the image's latents noised to step `start` (img2img, inpainting)
    3. the sampler calls the guided U-Net once (or twice) per step
    4. decode: x = vae.decode(z_0 / scaling_factor), mapped from [-1, 1] to [0, 1]

The random draws happen in the order diffusers' pipelines make them (posterior sample, then the
noise), so the same generator gives the same image.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .diffusion import samplers
from .diffusion.guidance import guided_eps
from .images import ImageInput, image_to_tensor, mask_to_tensor, to_pil

if TYPE_CHECKING:
    from .pipeline import StableDiffusion

def per_picture(x: Tensor, B: int, name: str) -> Tensor:
    """Rows for the B pictures made (prompts × num_images_per_prompt) from the n given: n = B, or n divides B
    and the n repeat in turn (1 2 1 2 ..., as diffusers tiles them)."""
    n = x.shape[0]
    if B % n:
        raise ValueError(f"{n} {name}s cannot be shared out over {B} pictures (prompts × num_images_per_prompt): "
                         f"give one, or as many as the pictures, or a number that divides it")
    return x.repeat(B // n, *([1] * (x.ndim - 1)))


def decode_latents(pipe: StableDiffusion, z: Tensor) -> Tensor:
    """z (B, 4, h, w) -> images (B, 3, H, W) in [0, 1]; reruns in fp32 if fp16 overflows to NaN/inf
    (the SD 1.x VAE's activations can exceed fp16's range)."""
    vae = pipe.vae

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
    return (x.float() / 2 + 0.5).clamp(0, 1)


def encode_image(pipe: StableDiffusion, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Pixels in [-1, 1] -> scaled latents z = scaling_factor · z₀, z₀ ~ q(z₀|x) (a sample, as diffusers)."""
    posterior = pipe.vae.encode(x.to(pipe.device, pipe.vae.dtype))
    return (posterior.sample(generator) * pipe.vae.scaling_factor).to(pipe.dtype)


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
          dtype: torch.dtype) -> Tensor:
    """Noise drawn on the generator's device (CPU for seeds, so a seed gives the same image everywhere)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def check_arguments(steps: int, height: int, width: int, strength: float, guidance_scale: float) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")


@torch.inference_mode()
def generate(pipe: StableDiffusion, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
             num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
             width: int | None = None, sampler: str = "ddim", karras: bool = False, eta: float = 0.0,
             seed: int | None = None, generator: torch.Generator | None = None, latents: Tensor | None = None,
             num_images_per_prompt: int = 1, callback=None, output_type: str = "pil", clip_skip: int = 0,
             image: ImageInput | None = None, strength: float = 1.0, mask_image: ImageInput | None = None,
             keep_unmasked: bool = False, control: dict | None = None):
    """See `StableDiffusion.__call__`, `.img2img` and `.inpaint`. `control`: ControlNet arguments."""
    if output_type not in ("pil", "pt", "latent"):
        raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
    samplers.get_sampler(sampler)  # unknown names fail before any work
    device, dtype = pipe.device, pipe.dtype
    f = pipe.vae.config.downsampling
    x_image = image_to_tensor(image, height, width) if image is not None else None
    if x_image is not None:
        height, width = x_image.shape[-2:]
    height, width = height or pipe.image_size, width or pipe.image_size
    check_arguments(num_inference_steps, height, width, strength, guidance_scale)
    if generator is None and seed is not None:
        generator = torch.Generator("cpu").manual_seed(seed)

    # 1. text conditioning
    cond, uncond = pipe.encode_prompt(prompt, negative_prompt, guidance_scale, num_images_per_prompt, clip_skip)
    B = cond.shape[0]
    shape = (B, pipe.unet.config.out_channels, height // f, width // f)

    # 2. the schedule, and where on it to start
    schedule = samplers.make_schedule(sampler, num_inference_steps, pipe.scheduler, karras)
    if image is not None:  # start part-way: strength 1 runs every step, 0.3 only the last 30%
        init_steps = min(int(num_inference_steps * strength), num_inference_steps)
        if init_steps < 1:
            raise ValueError(f"strength {strength} with {num_inference_steps} steps leaves no step to run; "
                             f"raise strength or num_inference_steps")
        start = num_inference_steps - init_steps
        schedule = samplers.truncate(schedule, start)
    extra, blend = None, None
    nine_channels = pipe.unet.config.in_channels == 9
    if mask_image is not None and x_image is None:
        raise ValueError("inpainting needs an image as well as a mask_image")
    if keep_unmasked and mask_image is None:
        raise ValueError("keep_unmasked pastes the image back outside the mask: it needs a mask_image")

    if x_image is None:  # text-to-image: pure noise
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            noise = latents.to(device, dtype)
        else:
            noise = randn(shape, generator, device, dtype)
        z = noise * schedule.init_sigma
    elif mask_image is None:  # img2img: the image's latents, noised to the first step
        z0 = per_picture(encode_image(pipe, x_image, generator), B, "image")
        noise = randn(shape, generator, device, dtype)
        z = samplers.add_noise(sampler, z0, noise, schedule, 0)
    else:  # inpainting
        mask = mask_to_tensor(mask_image, height, width)
        if len(mask) != len(x_image) and 1 not in (len(mask), len(x_image)):
            raise ValueError(f"{len(x_image)} images and {len(mask)} masks: give as many masks as images, or one of either")
        masked = x_image * (mask < 0.5)
        z0 = None
        if not nine_channels or strength < 1.0:
            z0 = per_picture(encode_image(pipe, x_image, generator), B, "image")
        noise = latents.to(device, dtype) if latents is not None else randn(shape, generator, device, dtype)
        z = noise * schedule.init_sigma if strength >= 1.0 else samplers.add_noise(sampler, z0, noise, schedule, 0)
        mask_latent = per_picture(F.interpolate(mask, size=(height // f, width // f)).to(device, dtype), B, "mask_image")
        if nine_channels:  # the inpainting U-Net sees the mask and the masked image's latents
            masked_latents = per_picture(encode_image(pipe, masked, generator), B, "masked image")
            extra = torch.cat([mask_latent, masked_latents], dim=1)
        else:  # a standard U-Net: paste the (noised) known latents back outside the mask after each step
            if pipe.unet.config.in_channels != 4:
                raise ValueError(f"inpainting needs a 4- or 9-channel U-Net, not {pipe.unet.config.in_channels}")
            encode_image(pipe, masked, generator)  # diffusers draws this sample too; keep the same random stream

            def blend(i, t, latents, x0_hat):
                last = i + 1 >= len(schedule.timesteps)
                known = z0 if last else samplers.add_noise(sampler, z0, noise, schedule, i + 1)
                return (1 - mask_latent) * known + mask_latent * latents

    control_fn = None
    if control:
        from .adapters.controlnet import control_function

        control_fn = control_function(pipe.controlnets, control, schedule.timesteps, B, uncond is not None,
                                      height, width, device, dtype)

    # 3. the sampling loop
    eps = guided_eps(pipe.unet, cond, uncond, guidance_scale, pipe.scheduler, extra_channels=extra,
                     control=control_fn, timesteps=schedule.timesteps)
    steps = len(schedule.timesteps)
    bar = _progress(steps, pipe.progress)

    def on_step(i, t, latents, x0_hat):
        out = blend(i, t, latents, x0_hat) if blend is not None else None
        bar.update(1)
        if callback is not None:
            callback(i, t, latents if out is None else out)
        return out

    try:
        z = samplers.run(sampler, eps, z, schedule, eta=eta, generator=generator, callback=on_step)
    finally:
        bar.close()

    # 4. decode
    if output_type == "latent":
        return z
    images = decode_latents(pipe, z)
    if keep_unmasked:  # the VAE's round trip changes every pixel a little: paste the original back outside the mask
        m = per_picture(mask, B, "mask_image").to(images.device, images.dtype)
        images = m * images + (1 - m) * (per_picture(x_image, B, "image").to(images.device, images.dtype) / 2 + 0.5)
    return images if output_type == "pt" else to_pil(images)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="sampling", leave=False)
