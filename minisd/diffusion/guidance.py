"""Classifier-free guidance: one network, two questions, extrapolated.

    ε̃(z_t, c) = ε(z_t, ∅) + s · (ε(z_t, c) − ε(z_t, ∅))                 (Ho & Salimans 2021, eq. 6)

ε(z_t, ∅) is the prediction for the empty prompt (which the model learned from ~10% caption dropout
during training), or for a negative prompt, which then plays the part of the "unconditional" branch.
s = 1 is plain conditional sampling; SD's default is 7.5. Both branches run as one batch of 2B.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..diffusion.schedules import SchedulerConfig
from ..models.unet import UNet

ControlFn = Callable[[Tensor, Tensor, Tensor], tuple[list[Tensor], Tensor] | None]


def to_eps(out: Tensor, z_t: Tensor, alpha_bar: float, prediction_type: str) -> Tensor:
    """Whatever the network predicts, as ε̂: for v = √ᾱ ε − √(1−ᾱ) z₀ (SD 2.x 768), ε̂ = √ᾱ v + √(1−ᾱ) z_t;
    for a z₀ prediction, ε̂ = (z_t − √ᾱ ẑ₀)/√(1−ᾱ)."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return alpha_bar**0.5 * out + (1 - alpha_bar) ** 0.5 * z_t
    return (z_t - alpha_bar**0.5 * out) / (1 - alpha_bar) ** 0.5


def guided_eps(unet: UNet, cond: Tensor, uncond: Tensor | None, scale: float, scheduler: SchedulerConfig,
               extra_channels: Tensor | None = None, control: ControlFn | None = None,
               timesteps: Tensor | None = None):
    """The function samplers call: (z_t, t, ᾱ_t) -> guided ε̂.

    cond/uncond: text embeddings (B, T, E); uncond None runs one branch (scale ignored).
    extra_channels: (B, C', h, w) appended to z_t on channels (a 9-channel inpainting U-Net's mask and
    masked-image latents). control(z_t, t, context) -> ControlNet residuals for the U-Net, or None.
    timesteps: the schedule's, copied to the device once here, so that no step waits on a host-to-device
    copy (a synchronising copy per step costs more than a tiny model's whole step on a GPU).
    """
    context = cond if uncond is None else torch.cat([uncond, cond])  # (2B, T, E): [∅, c], as diffusers
    on_device = {}
    if timesteps is not None:
        on_device = dict(zip(timesteps.tolist(), timesteps.to(cond.device).unbind()))
    cudagraphs = getattr(unet, "_minisd_cudagraphs", False)  # pipe.compile(mode="reduce-overhead")

    def eps(z_t: Tensor, t: Tensor, alpha_bar: float) -> Tensor:
        z_in = z_t if uncond is None else torch.cat([z_t, z_t])
        x_in = z_in
        if extra_channels is not None:
            extra = extra_channels if uncond is None else torch.cat([extra_channels, extra_channels])
            x_in = torch.cat([z_in, extra.to(z_in.dtype)], dim=1)
        t_in = on_device.get(float(t)) if on_device else None
        t_in = torch.as_tensor(t, device=z_t.device) if t_in is None else t_in
        residuals = control(z_in, t_in, context) if control is not None else None
        out = unet(x_in.to(unet.dtype), t_in, context, control=residuals).to(z_t.dtype)
        if cudagraphs:  # the graph's output buffer is overwritten by the next replay: keep a copy
            out = out.clone()
        out = to_eps(out, z_in, alpha_bar, scheduler.prediction_type)
        if uncond is None:
            return out
        e_uncond, e_cond = out.chunk(2)
        return e_uncond + scale * (e_cond - e_uncond)

    return eps
