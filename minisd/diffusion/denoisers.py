"""Denoisers: a network turned into what samplers call, by small wrappers that compose (k-diffusion style).

The innermost layer has the U-Net's own signature, `net(z, t, context, control=None) -> output`; each
wrapper takes such a callable and returns one, adding one idea:

    unet_backbone       the network itself: dtypes in and out, the timestep already on the device, SDXL's
                        added conditions (pooled text, size ids) and an LCM U-Net's embedded guidance scale
                        (`guidance_condition`) riding along with the context
    mmdit_backbone      the same for SD 3's MMDiT: its pooled text rides along, t is the flow schedule's N·σ
    copy_output         a copy of the output (CUDA graphs overwrite their output buffer on the next replay)
    with_extra_channels [z, mask, masked-image latents] on channels (a 9-channel inpainting U-Net)
    with_controlnet     ControlNet residuals computed from (z, t, context) and handed to the U-Net
    FiniteCheck.net     stop (or warn) at the first NaN/inf a component produces, naming it and the step
    with_cfg            classifier-free guidance: one batch of [∅, c], extrapolated (and rescaled); -> (z, t) -> output
    with_embedded_guidance  guidance distilled into the network (LCM): [c] alone, the scale an input; -> (z, t) -> out
    as_eps              whatever the network predicts (ε, v, ẑ₀) as ε̂;                -> (z, t, ᾱ_t) -> ε̂

Classifier-free guidance (Ho & Salimans 2021, eq. 6):

    ε̃(z_t, c) = ε(z_t, ∅) + s · (ε(z_t, c) − ε(z_t, ∅))

ε(z_t, ∅) is the prediction for the empty prompt (which the model learned from ~10% caption dropout
during training), or for a negative prompt, which then plays the part of the "unconditional" branch.
s = 1 is plain conditional sampling; SD's default is 7.5. Both branches run as one batch of 2B, and
guidance combines the network's raw outputs before they become ε̂, as diffusers' pipelines do.

Guidance rescale (Lin et al. 2024, §3.4, eq. 15–16): a large s inflates the guided prediction's
standard deviation (over-exposed, washed-out pictures, worst with a zero-terminal-SNR schedule); with φ in [0, 1]

    ε̃_rescaled = φ · ε̃ · std(ε(z_t, c)) / std(ε̃) + (1 − φ) · ε̃,   std over each sample's C, H, W

Guidance distilled into the network (latent consistency models, Luo et al. 2023, §4.2): the student learnt
to give in one pass what the teacher gave with guidance at scale s, and reads s itself, as an embedding of
w = s − 1 added to its time embedding (LCM writes guidance as ε(z_t, c) + w·(ε(z_t, c) − ε(z_t, ∅)), the same
extrapolation with s = 1 + w). No unconditional branch runs, and no negative prompt has a place.

`samplers.run` takes the guided `(z_t, t) -> output` with the prediction type and turns the output into
what its sampler calls (`to_eps`, `to_x0`; a flow model's velocity goes to the flow samplers as it is).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

Net = Callable[..., Tensor]                             # (z, t, context, control=None) -> network output
Guided = Callable[[Tensor, Tensor], Tensor]             # (z_t, t) -> network output, guided
Denoiser = Callable[[Tensor, Tensor, float], Tensor]    # (z_t, t, ᾱ_t) -> ε̂: what `samplers.run` calls
ControlFn = Callable[[Tensor, Tensor, Tensor], tuple[list[Tensor], Tensor] | None]  # (z, t, context) -> residuals
NAN_CHECKS = ("error", "warn", "off")


def timesteps_on_device(timesteps: Tensor, device: torch.device | str) -> Callable[[Tensor], Tensor]:
    """t (a CPU scalar of the schedule) -> the same t on `device`. The schedule is copied once, here, so that
    no step waits on a host-to-device copy (a synchronising copy per step costs more than a tiny model's
    whole step on a GPU); a t outside the schedule is copied when it comes."""
    table = dict(zip(timesteps.tolist(), timesteps.to(device).unbind()))

    def on_device(t: Tensor) -> Tensor:
        t_dev = table.get(float(t))
        return torch.as_tensor(t, device=device) if t_dev is None else t_dev

    return on_device


def unet_backbone(unet, on_device: Callable[[Tensor], Tensor], added: dict[str, Tensor] | None = None) -> Net:
    """The network call: z in the U-Net's dtype, t on its device, the output back in z's dtype.
    `added`: conditions the U-Net reads beside the context (SDXL: `pooled` (B', P) and `time_ids` (B', n)),
    one row per row of the batch it is called on: under guidance, [∅, c] stacked as `with_cfg` stacks the context."""
    added = added or {}

    def net(z: Tensor, t: Tensor, context: Tensor, control=None) -> Tensor:
        return unet(z.to(unet.dtype), on_device(t), context, control=control, **added).to(z.dtype)

    return net


def mmdit_backbone(transformer, on_device: Callable[[Tensor], Tensor], pooled: Tensor) -> Net:
    """SD 3's MMDiT as a Net: net(z, t, context) -> the predicted velocity, in z's dtype. t is the flow
    schedule's N·σ, as diffusers' StableDiffusion3Pipeline passes it; `pooled` (B', P) rides along with the
    context, one row per row of the batch (under guidance [∅, c], as `with_cfg` stacks the context)."""
    dtype = next(transformer.parameters()).dtype

    def net(z: Tensor, t: Tensor, context: Tensor, control=None) -> Tensor:
        if control is not None:
            raise ValueError("ControlNet residuals have no place in an MMDiT")
        return transformer(z.to(dtype), context, pooled, on_device(t).expand(len(z))).to(z.dtype)

    return net


def copy_output(net: Net) -> Net:
    """A CUDA graph's output buffer is overwritten by its next replay (the CFG halves, or the next step,
    would read another call's numbers): keep a copy. Added when the U-Net was compiled with CUDA graphs."""
    def copied(z: Tensor, t: Tensor, context: Tensor, control=None) -> Tensor:
        return net(z, t, context, control=control).clone()

    return copied


def with_extra_channels(net: Net, extra: Tensor) -> Net:
    """extra (B, C', h, w) appended to z on channels, repeated over the batch (the CFG halves both get it):
    a 9-channel inpainting U-Net's mask (1) and masked-image latents (4)."""
    def extended(z: Tensor, t: Tensor, context: Tensor, control=None) -> Tensor:
        e = extra if len(extra) == len(z) else torch.cat([extra] * (len(z) // len(extra)))
        return net(torch.cat([z, e.to(z.dtype)], dim=1), t, context, control=control)

    return extended


def with_controlnet(net: Net, residuals: ControlFn) -> Net:
    """ControlNet residuals from (z, t, context), added to the U-Net's skips (None: none at this step).
    z is the latent alone: the ControlNet never sees a 9-channel U-Net's extra channels."""
    def controlled(z: Tensor, t: Tensor, context: Tensor, control=None) -> Tensor:
        return net(z, t, context, control=residuals(z, t, context))

    return controlled


def with_cfg(net: Net, cond: Tensor, uncond: Tensor | None, scale: float, rescale: float = 0.0) -> Guided:
    """Classifier-free guidance over one batch [∅, c] (diffusers' order). cond/uncond: text embeddings
    (B, T, E); uncond None runs the conditional branch alone (scale and rescale ignored). rescale φ > 0
    pulls the guided output's std toward the conditional one's (`rescale_guidance`)."""
    if uncond is None:
        return lambda z, t: net(z, t, cond)
    context = torch.cat([uncond, cond])  # (2B, T, E)

    def guided(z: Tensor, t: Tensor) -> Tensor:
        out_uncond, out_cond = net(torch.cat([z, z]), t, context).chunk(2)
        out = out_uncond + scale * (out_cond - out_uncond)
        return rescale_guidance(out, out_cond, rescale) if rescale > 0 else out

    return guided


def guidance_scale_embedding(w: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """w (B,) -> (B, dim): the sinusoidal embedding of 1000·w (Kingma et al. 2021, VDM's code), sin half first,
    frequencies 10000^(−i/(dim/2 − 1)); zero-padded to an odd dim. Computed in diffusers' order of operations
    (`LatentConsistencyModelPipeline.get_guidance_scale_embedding`): at 1000·w the angles reach thousands of
    radians, where one rounding more in a frequency moves a sine by 1e-3."""
    if w.ndim != 1:
        raise ValueError(f"w must be one guidance scale per sample, shape (B,), got {tuple(w.shape)}")
    w = w * 1000.0
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -step)
    angles = w.to(dtype)[:, None] * freqs[None, :]  # (B, dim/2)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 == 1 else emb


def guidance_condition(scale: float, rows: int, dim: int, device: torch.device | str,
                       dtype: torch.dtype) -> dict[str, Tensor]:
    """What a guidance-distilled (LCM) U-Net reads besides the context, as an added condition of `unet_backbone`:
    `timestep_cond`, the embedding of w = scale − 1 (W wide) for each of the `rows` rows, as diffusers'
    LatentConsistencyModelPipeline feeds it (its default guidance_scale 8.5 is w = 7.5)."""
    if not math.isfinite(scale):
        raise ValueError(f"guidance_scale must be finite, got {scale!r}")
    w = torch.full((rows,), float(scale) - 1.0)
    return {"timestep_cond": guidance_scale_embedding(w, dim).to(device, dtype)}


def with_embedded_guidance(net: Net, cond: Tensor) -> Guided:
    """Guidance distilled into the network: the conditional branch alone, one pass a step; the scale reaches
    the network through its backbone's `guidance_condition`. cond: text embeddings (B, T, E)."""
    return lambda z, t: net(z, t, cond)


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2024, eq. 15–16 (diffusers' `rescale_noise_cfg`): φ · guided · std(cond)/std(guided)
    + (1 − φ) · guided, the std's per sample over all but the batch dimension."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def to_eps(out: Tensor, z_t: Tensor, alpha_bar: float, prediction_type: str) -> Tensor:
    """Whatever the network predicts, as ε̂: for v = √ᾱ ε − √(1−ᾱ) z₀ (SD 2.x 768), ε̂ = √ᾱ v + √(1−ᾱ) z_t;
    for a z₀ prediction ("sample"), ε̂ = (z_t − √ᾱ ẑ₀)/√(1−ᾱ). A flow model's velocity lives on another
    path, x_σ = (1−σ) z₀ + σ ε with no ᾱ: the flow samplers take it as it is."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return alpha_bar**0.5 * out + (1 - alpha_bar) ** 0.5 * z_t
    if prediction_type == "sample":
        return (z_t - alpha_bar**0.5 * out) / (1 - alpha_bar) ** 0.5
    raise unknown_prediction(prediction_type)


def to_x0(out: Tensor, z_t: Tensor, alpha_bar: float, prediction_type: str) -> Tensor:
    """Whatever the network predicts, as ẑ₀ (eq. 2 solved for z₀): (z_t − √(1−ᾱ) ε̂)/√ᾱ; √ᾱ z_t − √(1−ᾱ) v
    for v, which stays exact at ᾱ = 0 (a zero-terminal-SNR schedule's last step: ẑ₀ = −v); ẑ₀ itself."""
    if prediction_type == "epsilon":
        return (z_t - (1 - alpha_bar) ** 0.5 * out) / alpha_bar**0.5
    if prediction_type == "v_prediction":
        return alpha_bar**0.5 * z_t - (1 - alpha_bar) ** 0.5 * out
    if prediction_type == "sample":
        return out
    raise unknown_prediction(prediction_type)


def unknown_prediction(prediction_type: str) -> ValueError:
    """The error for a prediction type that has no ε̂ or ẑ₀ here."""
    if prediction_type == "flow":
        return ValueError("prediction_type 'flow' is a velocity on the flow-matching path, which has no ᾱ: "
                         "sample it with a flow sampler ('flow_euler')")
    return ValueError(f"unknown prediction_type {prediction_type!r}; expected 'epsilon', 'v_prediction', 'sample' "
                      f"or 'flow'")


def as_eps(model: Guided, prediction_type: str) -> Denoiser:
    """(z_t, t) -> network output, as (z_t, t, ᾱ_t) -> ε̂ (see `to_eps`)."""
    if prediction_type == "epsilon":
        return lambda z, t, alpha_bar: model(z, t)
    return lambda z, t, alpha_bar: to_eps(model(z, t), z, alpha_bar, prediction_type)


# ─── NaN/inf checks ────────────────────────────────────────────────────────────────────────────────

def check_mode(mode: str) -> str:
    if mode not in NAN_CHECKS:
        raise ValueError(f"nan_check must be one of {', '.join(map(repr, NAN_CHECKS))}, got {mode!r}")
    return mode


def report_non_finite(message: str, mode: str) -> None:
    """Raise FloatingPointError ("error") or warn ("warn") with `message`."""
    if check_mode(mode) == "error":
        raise FloatingPointError(message + "; set pipe.nan_check = 'warn' to go on regardless")
    if mode == "warn":
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_finite(x: Tensor, what: str, mode: str) -> Tensor:
    """x unchanged if every value is finite; else report "the {what} produced NaN/inf" (see `report_non_finite`)."""
    if mode != "off" and not torch.isfinite(x).all():
        report_non_finite(f"the {what} produced NaN/inf", mode)
    return x


def _all_finite(out) -> Tensor:
    """One device flag for a tensor or ControlNet residuals ((down list, mid) or None); no host sync."""
    tensors = [] if out is None else [out] if isinstance(out, Tensor) else [*out[0], out[1]]
    if not tensors:
        return torch.tensor(True)
    return torch.stack([torch.isfinite(x).all() for x in tensors]).all()


class FiniteCheck:
    """Watches the networks' outputs during one sampling run: the first NaN/inf stops it with
    "the U-Net produced NaN/inf at step 3 of 25 (t=881)" (mode "error"), or warns once per component
    ("warn"). On a CPU each output is checked as it comes; elsewhere a flag is read one call later, once
    the next call is queued, so that the check never leaves the accelerator waiting. `flush()` reads the rest."""

    def __init__(self, mode: str, timesteps: Tensor):
        self.mode = check_mode(mode)
        self.steps = [float(t) for t in timesteps]
        self.pending: list[tuple[Tensor, str, float]] = []  # (flag on the device, component, t)
        self.warned: set[str] = set()

    def net(self, net: Net, component: str = "U-Net") -> Net:
        """net, its output checked; net itself when the mode is "off"."""
        if self.mode == "off":
            return net

        def checked(z: Tensor, t: Tensor, context: Tensor, control=None) -> Tensor:
            return self.watch(net(z, t, context, control=control), component, z, t)

        return checked

    def control(self, residuals: ControlFn, component: str = "ControlNet") -> ControlFn:
        """A ControlNet's residuals, checked; residuals itself when the mode is "off"."""
        if self.mode == "off":
            return residuals
        return lambda z, t, context: self.watch(residuals(z, t, context), component, z, t)

    def watch(self, out, component: str, z: Tensor, t: Tensor):
        self.pending.append((_all_finite(out), component, float(t)))
        self.flush(keep=0 if z.device.type == "cpu" else 1)
        return out

    def flush(self, keep: int = 0) -> None:
        """Read all but the last `keep` flags, in order."""
        while len(self.pending) > keep:
            flag, component, t = self.pending.pop(0)
            if not bool(flag) and component not in self.warned:
                self.warned.add(component)
                report_non_finite(f"the {component} produced NaN/inf at {self.where(t)}", self.mode)

    def where(self, t: float) -> str:
        """"step 3 of 25 (t=881)": the first step of the schedule at t (1-based)."""
        i = min(range(len(self.steps)), key=lambda k: abs(self.steps[k] - t))
        return f"step {i + 1} of {len(self.steps)} (t={t:g})"
