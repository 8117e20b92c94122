"""The mean-brightness failure of a schedule that never reaches zero SNR (Lin et al. 2024), in the shapes world.

Under SD's schedule the noisiest training input still holds √ᾱ₉₉₉ ≈ 0.068 of the picture, and the
picture's overall brightness survives there as the latent's channel means: a model trained on it learns to
read the brightness from them. Sampling starts from pure noise, whose channel means are random (standard
deviation 1/side for a side × side latent), and the model reads them as the picture's.

The test: prompts that name a white background, each started from its own noise with the channel means
replaced by k standard deviations along the black direction (`direction`: the white-minus-black difference of
the VAE's channel means), the rest of the noise as drawn. k = −1 or −2 is a lean one noise in 6 or 44 has; a
model that takes the background from the prompt keeps drawing it white.

`background_kept` gives the records; `benchmarks/brightness.py` writes docs/results/brightness.json.
"""

from __future__ import annotations

import torch

from ..images import image_to_tensor
from .analyser import analyse, parse
from .world import BACKGROUNDS, BASE_SHAPES, COLOURS, PHRASES, POSITIONS, SIZES, Scene, render


@torch.no_grad()
def channel_means(pipe, background: str) -> torch.Tensor:
    """(C,) the latent channel means of an empty picture on `background`, as the U-Net sees latents (scaled)."""
    x = image_to_tensor(render(Scene(background, []))).to(pipe.device, pipe.vae.dtype)
    return (pipe.vae.encode(x).mean * pipe.vae.scaling_factor).float().mean(dim=(0, 2, 3)).cpu()


def direction(pipe) -> torch.Tensor:
    """(C,) unit vector: the white background's channel means minus the black one's, normalised."""
    d = channel_means(pipe, "white") - channel_means(pipe, "black")
    return d / d.norm()


def nudged_noise(seed: int, shape: tuple[int, int, int], unit: torch.Tensor, k: float) -> torch.Tensor:
    """Noise of `seed` (C, H, W) whose channel means are set to k random-draw standard deviations (1/√(H·W))
    along `unit` (k < 0: toward black); the rest of the noise unchanged."""
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    c, h, w = shape
    return noise - noise.mean(dim=(1, 2), keepdim=True) + (k / (h * w) ** 0.5) * unit.view(c, 1, 1)


def prompts(background: str = "white") -> list[str]:
    """Every one-object base-shape prompt (colour × shape × size × position, 180) on the named background."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background = {background!r}; one of {', '.join(BACKGROUNDS)}")
    return [f"a {size} {colour} {shape} {PHRASES[position]} on a {background} background"
            for colour in COLOURS for shape in BASE_SHAPES for size in SIZES for position in POSITIONS]


def background_kept(pipe, prompts: list[str], k: float, seed: int = 0, steps: int = 25,
                    guidance_scale: float = 7.5, batch: int = 60) -> tuple[list[bool], list]:
    """Prompt i drawn from `nudged_noise(seed + i, ..., k)` with the model's own sampler: whether each picture's
    background is the one its prompt names, and the pictures."""
    c = pipe.backbone.config
    unit = direction(pipe)
    shape = (c.in_channels if c.in_channels == 4 else 4, c.sample_size, c.sample_size)
    kept, images = [], []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        noise = torch.stack([nudged_noise(seed + start + i, shape, unit, k) for i in range(len(chunk))])
        images += list(pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, latents=noise,
                            generator=torch.Generator().manual_seed(seed + start)))
    for prompt, image in zip(prompts, images):
        kept.append(analyse(image).background == parse(prompt)[1])
    return kept, images
