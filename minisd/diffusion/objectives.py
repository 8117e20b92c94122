"""What the network is trained to predict: three targets from one forward process.

The discrete-time models noise a clean latent z₀ with ε ~ N(0, I) in one jump (schedules.py eq. 2):

    z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε

and are trained to predict either

    ε                                   "epsilon"       (DDPM, Ho et al. 2020; SD 1.x)
    v = √ᾱ_t ε − √(1−ᾱ_t) z₀             "v_prediction"  (Salimans & Ho 2022; SD 2.x 768-v)

v stays informative where ε does not: at ᾱ_T = 0 (a zero-terminal-SNR schedule, Lin et al. 2024) z_T is
pure noise, so predicting ε there is trivial and tells the sampler nothing about z₀, while v = −z₀.

Flow matching (rectified flow: Liu et al. 2022; Lipman et al. 2023; SD 3) walks a straight line instead:

    x_σ = (1−σ) z₀ + σ ε,   σ ∈ [0, 1],   target: the velocity dx/dσ = ε − z₀    "flow"

with σ drawn logit-normally (Esser et al. 2024: more training where the path is hardest, mid-way) and,
optionally, shifted toward noise, σ -> sσ/(1 + (s−1)σ), as `FlowMatchEulerDiscreteScheduler` does with
`shift`. The network sees t = N·σ, as diffusers feeds SD 3's transformer.

`noised_and_target` gives both halves of a training pair; `loss_weights` the Min-SNR-γ weighting
(Hang et al. 2023) that turns each target's loss into the same weighting of the error in z₀.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedules import snr

OBJECTIVES = ("epsilon", "v_prediction", "flow")


def check_objective(prediction_type: str) -> None:
    if prediction_type not in OBJECTIVES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; a model is trained to predict one of "
                         f"{', '.join(OBJECTIVES)}")


def v_target(z0: Tensor, eps: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """v = √ᾱ ε − √(1−ᾱ) z₀ (`alpha_bar_t` broadcast against z₀)."""
    return alpha_bar_t.sqrt() * eps - (1 - alpha_bar_t).sqrt() * z0


def shift_sigmas(sigma: Tensor, shift: float) -> Tensor:
    """σ -> sσ/(1 + (s−1)σ): s > 1 spends more of the steps (or the training) at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def logit_normal_sigmas(n: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0,
                        shift: float = 1.0) -> Tensor:
    """n noise levels σ = sigmoid(u), u ~ N(mean, std²), then shifted (SD 3's training density)."""
    u = mean + std * torch.randn(n, generator=generator)
    return shift_sigmas(torch.sigmoid(u), shift)


def draw_timesteps(prediction_type: str, n: int, num_train_timesteps: int, generator: torch.Generator | None = None,
                   shift: float = 1.0) -> Tensor:
    """The network's timesteps for a training batch: integers uniform in [0, N) for the discrete models,
    N·σ (float) with σ logit-normal and shifted for flow."""
    check_objective(prediction_type)
    if prediction_type == "flow":
        return num_train_timesteps * logit_normal_sigmas(n, generator, shift=shift)
    return torch.randint(0, num_train_timesteps, (n,), generator=generator)


def noised_and_target(prediction_type: str, z0: Tensor, eps: Tensor, t: Tensor, alpha_bar: Tensor,
                      num_train_timesteps: int = 1000) -> tuple[Tensor, Tensor]:
    """(the network's input, what it should output) for clean latents z₀, noise ε and timesteps t from
    `draw_timesteps`; `alpha_bar` is the schedule's ᾱ table (unused for flow)."""
    check_objective(prediction_type)
    if prediction_type == "flow":
        sigma = (t / num_train_timesteps).view(-1, 1, 1, 1).to(z0.dtype)
        return (1 - sigma) * z0 + sigma * eps, eps - z0
    a = alpha_bar[t].view(-1, 1, 1, 1).to(z0.dtype)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    return z_t, (eps if prediction_type == "epsilon" else v_target(z0, eps, a))


def loss_weights(prediction_type: str, t: Tensor, alpha_bar: Tensor, min_snr_gamma: float | None) -> Tensor | None:
    """Min-SNR-γ per sample, or None (all weights 1; always for flow, whose density already shapes it).
    The error in z₀ weighted by min(SNR, γ) is, in terms of the predicted target,
    min(SNR, γ)/SNR · ‖ε error‖² for ε and min(SNR, γ)/(SNR + 1) · ‖v error‖² for v (Hang et al. 2023)."""
    if min_snr_gamma is None or prediction_type == "flow":
        return None
    s = snr(alpha_bar)[t]
    clipped = s.clamp(max=min_snr_gamma)
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    return torch.where(s > 0, clipped / s.clamp(min=1e-20), torch.ones_like(s))  # ε at SNR 0: nothing to weigh
