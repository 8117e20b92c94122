"""Samplers: pure functions that walk noise back to an image latent, one model call (or two) per step.

Two families, as in the literature:

* discrete-time samplers on the training timesteps t (DDPM, DDIM, PNDM/PLMS) work on z_t, with
  z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε, and call `eps(z_t, t)`, the model's noise prediction;
* noise-level samplers (Euler, Euler ancestral, Heun, LMS, DPM-Solver++ 2M) work on
  x = z_t / √ᾱ_t = z_0 + σ ε (Karras et al. 2022, "EDM"), and call `denoise(x, σ, t)`, the model's
  estimate of z_0: x̂₀ = x − σ·ε̂. Each step is a step of an ODE (or SDE) solver in σ.

and a third for flow-matching models (Lipman et al. 2023; SD3): x_σ = (1−σ) z_0 + σ ε, σ from 1 to 0, and
the network predicts the velocity v = ε − z_0; `flow_euler` calls `velocity(x, t)` and steps along it.

A discrete sampler's `eps(z_t, t)` returns ε̂, or the pair (ε̂, x̂₀) when the network predicts x̂₀ more
directly than ε̂ (v or z₀): at ᾱ_t = 0 (a zero-terminal-SNR schedule's last timestep) ε̂ = z_t says
nothing about z_0, and x̂₀ must come from the network's own output.

Every function takes its schedule explicitly (timesteps, σ's, ᾱ's) and returns the final latents.
`make_schedule` computes those tensors exactly as the diffusers scheduler of the same name does from
a model's `scheduler_config.json`, so the same noise gives the same image (tests compare step by step).

callback(i, t, latents, x0_hat) is called after each step with the current latents (in the sampler's
space) and the model's current estimate of the clean latents; if it returns a tensor, that tensor
replaces the latents (inpainting pastes the known region back this way).

A sampler is one function plus one `Sampler` entry in `SAMPLERS` (at the end of this file), which carries
everything else: its kind, default spacing, the diffusers class it reproduces, its label as AUTOMATIC1111
writes it, its schedule function and the options it takes. `make_schedule` and `run` read the entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .denoisers import to_eps, to_x0
from .schedules import SchedulerConfig

EpsFn = Callable[[Tensor, Tensor], Tensor | tuple[Tensor, Tensor]]  # (z_t, t) -> ε̂, or (ε̂, x̂₀)
VelocityFn = Callable[[Tensor, Tensor], Tensor]         # (x_σ, t) -> v̂ (flow matching)
DenoiseFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, σ, t) -> x̂₀
Callback = Callable[[int, Tensor, Tensor, Tensor], None] | None


# ─── schedules ─────────────────────────────────────────────────────────────────────────────────────

@dataclass
class Schedule:
    """What one sampling run walks through."""

    timesteps: Tensor        # (n,) the t fed to the model at each step (float; PNDM repeats one)
    sigmas: Tensor | None    # (n+1,) σ per step and 0 at the end (noise-level samplers)
    alphas_cumprod: Tensor   # (N,) ᾱ of the training schedule
    step_ratio: int          # N // steps: DDIM/DDPM/PNDM's distance to the previous timestep
    init_sigma: float        # the initial noise is N(0, init_sigma²): 1 for z-space samplers
    final_alpha: float       # ᾱ "before" t=0 (1, or ᾱ_0 when set_alpha_to_one is False)


def spaced_timesteps(n: int, N: int, spacing: str, steps_offset: int) -> np.ndarray:
    """n of the N training timesteps, largest first (Lin et al. 2024, table 2, on the three spacings):
    leading  0, N/n, 2N/n, ... + offset   (SD 1.x: 981, 961, ..., 1 for n = 50)
    trailing N−1, N−1−N/n, ...            (reaches t = N−1, the pure-noise end)
    linspace n points evenly over [0, N−1] (fractional)"""
    if spacing == "leading":
        return (np.arange(0, n) * (N // n)).round()[::-1].astype(np.float32) + steps_offset
    if spacing == "trailing":
        return np.arange(N, 0, -N / n).round().astype(np.float32) - 1
    if spacing == "linspace":
        return np.linspace(0, N - 1, n, dtype=np.float32)[::-1].copy()
    raise ValueError(f"unknown timestep spacing {spacing!r}")


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ — more steps at low noise."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) timestep of a noise level: linear interpolation in log σ between table entries."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def make_schedule(sampler: str, steps: int, config: SchedulerConfig, karras: bool = False) -> Schedule:
    """The timesteps/σ's the diffusers scheduler `SAMPLERS[sampler].diffusers_class` uses for `steps` steps."""
    s = get_sampler(sampler)
    if steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
    if s.kind == "discrete" and steps > config.num_train_timesteps:  # diffusers refuses too: every t would repeat
        raise ValueError(f"num_inference_steps {steps} is more than the model's {config.num_train_timesteps} training "
                         f"timesteps; {sampler} can take at most {config.num_train_timesteps}")
    if karras and s.kind != "sigma":
        raise ValueError(f"karras=True needs a noise-level sampler ({', '.join(k for k, v in SAMPLERS.items() if v.kind == 'sigma')}), not {sampler!r}")
    if config.rescale_betas_zero_snr and not s.zero_snr:
        raise ValueError(f"sampler {sampler!r} has no zero-terminal-SNR schedule (rescale_betas_zero_snr); "
                         f"use one of {', '.join(k for k, v in SAMPLERS.items() if v.zero_snr)}")
    alphas_cumprod = config.alphas_cumprod()
    set_alpha_to_one = config.set_alpha_to_one if config.set_alpha_to_one is not None else s.alpha_to_one
    final_alpha = 1.0 if set_alpha_to_one else alphas_cumprod[0].item()
    t, sig, init_sigma = s.schedule(steps, config, config.timestep_spacing or s.spacing, karras)
    sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32)) if sig is not None else None
    init_sigma = float(torch.tensor(init_sigma, dtype=torch.float32))
    return Schedule(torch.from_numpy(np.asarray(t, dtype=np.float32).copy()), sigmas, alphas_cumprod,
                    config.num_train_timesteps // steps, init_sigma, final_alpha)


# Each sampler's timesteps: (steps, config, spacing, karras) -> (t, σ's or None, initial noise σ).

def discrete_timesteps(steps: int, config: SchedulerConfig, spacing: str, karras: bool):
    """DDPM, DDIM: the spaced training timesteps; z_T is the noise itself (σ 1)."""
    return spaced_timesteps(steps, config.num_train_timesteps, spacing, config.steps_offset), None, 1.0


def plms_timesteps(steps: int, config: SchedulerConfig, spacing: str, karras: bool):
    """PLMS: the second timestep is used twice (a warm-up step, see sample_pndm)."""
    t = spaced_timesteps(steps, config.num_train_timesteps, spacing, config.steps_offset)[::-1]
    return np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1].copy(), None, 1.0


def sigma_timesteps(steps: int, config: SchedulerConfig, spacing: str, karras: bool):
    """Euler, Heun, LMS: σ at the spaced timesteps (or Karras's σ's and their fractional t)."""
    N = config.num_train_timesteps
    all_sigmas = sigmas_table(config)
    t = spaced_timesteps(steps, N, spacing, config.steps_offset)
    sig = np.interp(t, np.arange(N), all_sigmas)
    if karras:
        sig = karras_sigmas(sig[-1].item(), sig[0].item(), steps)
        t = sigma_to_t(sig, np.log(all_sigmas))
    # diffusers' init_noise_sigma: σ_max for linspace/trailing, √(σ_max² + 1) for leading
    return t, sig, float(sig.max() if spacing in ("linspace", "trailing") else (sig.max() ** 2 + 1) ** 0.5)


def dpm_solver_timesteps(steps: int, config: SchedulerConfig, spacing: str, karras: bool):
    """DPMSolverMultistep spaces n+1 points and drops the last; Karras's σ's round to whole timesteps."""
    N = config.num_train_timesteps
    all_sigmas = sigmas_table(config)
    if spacing == "linspace":
        t = np.linspace(0, N - 1, steps + 1).round()[::-1][:-1].copy()
    elif spacing == "leading":
        t = (np.arange(0, steps + 1) * (N // (steps + 1))).round()[::-1][:-1].copy() + config.steps_offset
    else:
        t = np.arange(N, 0, -N / steps).round() - 1
    if karras:
        sig = karras_sigmas(all_sigmas[0].item(), all_sigmas[-1].item(), steps)
        t = sigma_to_t(sig, np.log(all_sigmas)).round()
    else:
        sig = np.interp(t, np.arange(N), all_sigmas)
    return t, sig, float((sig.max() ** 2 + 1) ** 0.5)  # diffusers keeps z_T = noise (init_noise_sigma 1)


def sigmas_table(config: SchedulerConfig) -> np.ndarray:
    """σ_t = √((1−ᾱ_t)/ᾱ_t) for every training timestep (float32, as diffusers). A zero-terminal-SNR
    schedule's ᾱ_{N−1} = 0 would make σ_max infinite: diffusers' noise-level schedulers set it to 2⁻²⁴
    (the smallest fp16 subnormal), σ_max ≈ 4096, and so does this."""
    alphas_cumprod = config.alphas_cumprod()
    if config.rescale_betas_zero_snr:
        alphas_cumprod[-1] = 2**-24
    return ((1 - alphas_cumprod) / alphas_cumprod).numpy() ** 0.5


LCM_ORIGINAL_STEPS = 50      # diffusers' LCMScheduler original_inference_steps: the distillation's schedule
LCM_TIMESTEP_SCALING = 10.0  # LCMScheduler timestep_scaling: c_skip, c_out are functions of 10·t
LCM_SIGMA_DATA = 0.5         # σ_data of the consistency-model parameterisation (Song et al. 2023)


def lcm_timesteps(steps: int, config: SchedulerConfig, spacing: str, karras: bool):
    """LCM (Luo et al. 2023): the model was distilled on the 50 timesteps k−1, 2k−1, ..., N−1 (k = N/50,
    the "skipping step"); `steps` of them are taken evenly from the top (4 steps: 999, 759, 499, 259)."""
    N = config.num_train_timesteps
    if N < LCM_ORIGINAL_STEPS or steps > LCM_ORIGINAL_STEPS:
        raise ValueError(f"lcm takes 1 to {LCM_ORIGINAL_STEPS} steps of a schedule of at least "
                         f"{LCM_ORIGINAL_STEPS} timesteps, got {steps} steps of {N}")
    origin = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * (N // LCM_ORIGINAL_STEPS) - 1)[::-1]
    picked = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[picked].astype(np.float32), None, 1.0


def flow_timesteps(steps: int, config: SchedulerConfig, spacing: str, karras: bool):
    """Flow matching (diffusers' FlowMatchEulerDiscreteScheduler): σ evenly spaced from σ_max to σ_min of
    the training table, through the shift σ -> sσ/(1 + (s−1)σ) (which pushes steps toward high noise;
    the table's σ_min is already shifted once, as diffusers has it), and t = N·σ."""
    N, shift = config.num_train_timesteps, config.shift
    table = np.linspace(1, N, N, dtype=np.float32)[::-1] / N
    table = shift * table / (1 + (shift - 1) * table)
    t = np.linspace(float(table[0]) * N, float(table[-1]) * N, steps)  # float64, as diffusers
    sig = t / N
    sig = (shift * sig / (1 + (shift - 1) * sig)).astype(np.float32)
    return sig * np.float32(N), sig, 1.0


def truncate(schedule: Schedule, start: int) -> Schedule:
    """The schedule from step `start` on (img2img and inpainting start part-way)."""
    sigmas = schedule.sigmas[start:] if schedule.sigmas is not None else None
    return Schedule(schedule.timesteps[start:], sigmas, schedule.alphas_cumprod, schedule.step_ratio,
                    schedule.init_sigma, schedule.final_alpha)


def _alpha(alphas_cumprod: Tensor, t: int, final_alpha: float) -> float:
    return alphas_cumprod[t].item() if t >= 0 else final_alpha


def _eps_and_x0(out: Tensor | tuple[Tensor, Tensor], z: Tensor, a_t: float) -> tuple[Tensor, Tensor]:
    """A discrete model's answer as (ε̂, x̂₀): given, or x̂₀ = (z_t − √(1−ᾱ_t) ε̂)/√ᾱ_t from ε̂ (eq. 2)."""
    if isinstance(out, tuple):
        return out
    return out, (z - (1 - a_t) ** 0.5 * out) / a_t**0.5


def _call(callback, i, t, latents, x0_hat) -> Tensor:
    out = callback(i, t, latents, x0_hat)
    return latents if out is None else out


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


# ─── discrete-time samplers (z_t space) ────────────────────────────────────────────────────────────

def sample_ddim(eps: EpsFn, z: Tensor, s: Schedule, *, eta: float = 0.0, generator=None, callback: Callback = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): predict x̂₀, then re-noise it to the previous timestep.

    x̂₀ = (z_t − √(1−ᾱ_t) ε̂) / √ᾱ_t
    z_prev = √ᾱ_prev x̂₀ + √(1−ᾱ_prev − σ²) ε̂ + σ ε',  σ = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_prev)
    η = 0 is deterministic; η = 1 is DDPM's posterior variance."""
    for i, t in enumerate(s.timesteps):
        a_t = _alpha(s.alphas_cumprod, int(t), s.final_alpha)
        a_prev = _alpha(s.alphas_cumprod, int(t) - s.step_ratio, s.final_alpha)
        e, x0_hat = _eps_and_x0(eps(z, t), z, a_t)
        sigma = eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * (1 - a_t / a_prev) ** 0.5
        z = a_prev**0.5 * x0_hat + (1 - a_prev - sigma**2) ** 0.5 * e
        if eta > 0:
            z = z + sigma * _randn(z, generator)
        if callback:
            z = _call(callback, i, t, z, x0_hat)
    return z


def sample_ddpm(eps: EpsFn, z: Tensor, s: Schedule, *, generator=None, callback: Callback = None,
                clip_sample: float | None = None) -> Tensor:
    """Ancestral sampling from the DDPM posterior q(z_prev | z_t, x̂₀) (Ho et al. 2020, eqs. 6–7):

    μ = √ᾱ_prev β_t/(1−ᾱ_t) x̂₀ + √α_t (1−ᾱ_prev)/(1−ᾱ_t) z_t,  σ² = (1−ᾱ_prev)/(1−ᾱ_t) β_t
    with α_t = ᾱ_t/ᾱ_prev and β_t = 1 − α_t over the (possibly skipped) step.
    clip_sample: clamp x̂₀ to [−c, c] first — what pixel-space DDPMs do (Ho et al.'s code, diffusers'
    `clip_sample`), since a small model's x̂₀ at high noise overshoots the data range; SD's latents
    have no fixed range and are not clipped."""
    n = len(s.timesteps)
    for i, t in enumerate(s.timesteps):
        a_t = _alpha(s.alphas_cumprod, int(t), s.final_alpha)
        t_prev = int(s.timesteps[i + 1]) if i + 1 < n else -1  # the next scheduled t (trailing: not t − N//n)
        a_prev = _alpha(s.alphas_cumprod, t_prev, 1.0)
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev
        _, x0_hat = _eps_and_x0(eps(z, t), z, a_t)
        if clip_sample is not None:
            x0_hat = x0_hat.clamp(-clip_sample, clip_sample)
        mean = (a_prev**0.5 * beta / (1 - a_t)) * x0_hat + (alpha**0.5 * (1 - a_prev) / (1 - a_t)) * z
        if int(t) > 0:
            var = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
            mean = mean + var**0.5 * _randn(z, generator)
        z = mean
        if callback:
            z = _call(callback, i, t, z, x0_hat)
    return z


def _plms_update(z: Tensor, e: Tensor, a_t: float, a_prev: float) -> Tensor:
    """PNDM's transfer step (Liu et al. 2022, eq. 11): z_t -> z_prev along the DDIM path given ε."""
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * z - (a_prev - a_t) * e / denom


def sample_pndm(eps: EpsFn, z: Tensor, s: Schedule, *, callback: Callback = None) -> Tensor:
    """PLMS, the pseudo linear multistep method (Liu et al. 2022): a 4th-order Adams–Bashforth
    combination of the last ε's, (55 ε_k − 59 ε_{k−1} + 37 ε_{k−2} − 9 ε_{k−3}) / 24, started by a
    2nd-order (Heun-like) step that evaluates the model twice at the first transition.
    Mirrors diffusers' PNDMScheduler (skip_prk_steps=True) call by call."""
    history: list[Tensor] = []  # ε's of previous full steps
    first_z = None
    for i, t in enumerate(s.timesteps):
        e = eps(z, t)
        e = e[0] if isinstance(e, tuple) else e  # PLMS combines ε's only
        t_cur, t_prev = int(t), int(t) - s.step_ratio
        if i == 1:  # the warm-up's second evaluation: average with the first, redo the first transition
            t_cur, t_prev = t_cur + s.step_ratio, t_cur
            e_used, z_from = (e + history[-1]) / 2, first_z
        else:
            history = history[-3:] + [e]
            n = len(history)
            if n == 1:
                e_used, first_z = e, z
            elif n == 2:
                e_used = (3 * history[-1] - history[-2]) / 2
            elif n == 3:
                e_used = (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
            else:
                e_used = (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4]) / 24
            z_from = z
        a_t = _alpha(s.alphas_cumprod, t_cur, s.final_alpha)
        a_prev = _alpha(s.alphas_cumprod, t_prev, s.final_alpha)
        z = _plms_update(z_from, e_used, a_t, a_prev)
        if callback:
            z = _call(callback, i, t, z, (z_from - (1 - a_t) ** 0.5 * e_used) / a_t**0.5)
    return z


def lcm_scalings(t: int) -> tuple[float, float]:
    """The consistency model's boundary condition (Song et al. 2023, eq. 7, on LCM's scaled time 10·t):
    c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/√((10t)² + σ_d²); c_skip → 1 and c_out → 0 as t → 0."""
    scaled = t * LCM_TIMESTEP_SCALING
    return LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2), scaled / (scaled**2 + LCM_SIGMA_DATA**2) ** 0.5


def sample_lcm(eps: EpsFn, z: Tensor, s: Schedule, *, generator=None, callback: Callback = None) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, alg. 1) for a latent consistency model (Luo et al.
    2023): the model's x̂₀ through the boundary condition, f = c_skip z_t + c_out x̂₀, is the answer at this
    step; it is noised to the next timestep with a fresh draw, z_next = √ᾱ_next f + √(1−ᾱ_next) ε', and the
    last step returns f itself. For LCM-distilled models (guidance about 1–2), as diffusers' LCMScheduler."""
    n = len(s.timesteps)
    for i, t in enumerate(s.timesteps):
        a_t = _alpha(s.alphas_cumprod, int(t), s.final_alpha)
        _, x0_hat = _eps_and_x0(eps(z, t), z, a_t)
        c_skip, c_out = lcm_scalings(int(t))
        denoised = c_out * x0_hat + c_skip * z
        if i + 1 < n:
            a_next = _alpha(s.alphas_cumprod, int(s.timesteps[i + 1]), s.final_alpha)
            z = a_next**0.5 * denoised + (1 - a_next) ** 0.5 * _randn(denoised, generator)
        else:
            z = denoised
        if callback:
            z = _call(callback, i, t, z, denoised)
    return z


# ─── noise-level samplers (x = z_t/√ᾱ_t space, k-diffusion style) ─────────────────────────────────

def sample_euler(denoise: DenoiseFn, x: Tensor, s: Schedule, *, callback: Callback = None) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x − x̂₀(x, σ))/σ (Karras et al. 2022, alg. 1)."""
    sig = s.sigmas
    for i, t in enumerate(s.timesteps):
        x0_hat = denoise(x, sig[i], t)
        d = (x - x0_hat) / sig[i]
        x = x + d * (sig[i + 1] - sig[i])
        if callback:
            x = _call(callback, i, t, x, x0_hat)
    return x


def sample_euler_a(denoise: DenoiseFn, x: Tensor, s: Schedule, *, generator=None, callback: Callback = None) -> Tensor:
    """Euler ancestral: step down to σ_down with the ODE, then add fresh noise of size σ_up, where
    σ_up² = σ_next² (σ² − σ_next²)/σ² and σ_down² = σ_next² − σ_up² (k-diffusion `get_ancestral_step`)."""
    sig = s.sigmas
    for i, t in enumerate(s.timesteps):
        x0_hat = denoise(x, sig[i], t)
        sigma_up = (sig[i + 1] ** 2 * (sig[i] ** 2 - sig[i + 1] ** 2) / sig[i] ** 2) ** 0.5
        sigma_down = (sig[i + 1] ** 2 - sigma_up**2) ** 0.5
        d = (x - x0_hat) / sig[i]
        x = x + d * (sigma_down - sig[i])
        x = x + _randn(x, generator) * sigma_up
        if callback:
            x = _call(callback, i, t, x, x0_hat)
    return x


def sample_heun(denoise: DenoiseFn, x: Tensor, s: Schedule, *, callback: Callback = None) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, alg. 1): an Euler step, then average the slopes at
    both ends; the last step (to σ = 0) is plain Euler. 2n − 1 model calls for n steps."""
    sig = s.sigmas
    for i, t in enumerate(s.timesteps):
        x0_hat = denoise(x, sig[i], t)
        d = (x - x0_hat) / sig[i]
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = x + d * dt
        else:
            x_next = x + d * dt
            d_next = (x_next - denoise(x_next, sig[i + 1], s.timesteps[i + 1])) / sig[i + 1]
            x = x + (d + d_next) / 2 * dt
        if callback:
            x = _call(callback, i, t, x, x0_hat)
    return x


def lms_coefficient(sigmas: Tensor, i: int, order: int, j: int) -> float:
    """∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ, ℓ_j the Lagrange basis polynomial through σ_i, σ_{i−1}, ... σ_{i−order+1}
    (exact: 4-point Gauss–Legendre integrates these degree-≤3 polynomials without error)."""
    nodes, weights = np.polynomial.legendre.leggauss(4)
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    tau = (b - a) / 2 * nodes + (a + b) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - float(sigmas[i - k])) / (float(sigmas[i - j]) - float(sigmas[i - k]))
    return float((b - a) / 2 * (weights * basis).sum())


def sample_lms(denoise: DenoiseFn, x: Tensor, s: Schedule, *, order: int = 4, callback: Callback = None) -> Tensor:
    """Linear multistep (Adams–Bashforth in σ): x_{i+1} = x_i + Σ_j c_ij d_{i−j}, with the slopes
    d = (x − x̂₀)/σ of the last `order` steps and c_ij the integrals of their Lagrange polynomials."""
    sig = s.sigmas
    slopes: list[Tensor] = []
    for i, t in enumerate(s.timesteps):
        x0_hat = denoise(x, sig[i], t)
        slopes = (slopes + [(x - x0_hat) / sig[i]])[-order:]
        k = min(i + 1, order)
        coeffs = [lms_coefficient(sig, i, k, j) for j in range(k)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(slopes)))
        if callback:
            x = _call(callback, i, t, x, x0_hat)
    return x


def sample_dpmpp_2m(denoise: DenoiseFn, x: Tensor, s: Schedule, *, callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2), in λ = −log σ: an exponential-integrator step with a
    2nd-order multistep correction of x̂₀; first and last steps are 1st order (as diffusers with
    final_sigmas_type="zero").
        x_{i+1} = (σ_{i+1}/σ_i) x_i − (e^{−h} − 1) D,  h = λ_{i+1} − λ_i,
        D = (1 + 1/2r) x̂₀_i − (1/2r) x̂₀_{i−1},  r = h_{i−1}/h."""
    sig = s.sigmas
    lam = lambda sigma: -torch.log(sigma)  # noqa: E731
    prev_x0 = None
    for i, t in enumerate(s.timesteps):
        x0_hat = denoise(x, sig[i], t)
        if sig[i + 1] == 0:  # the final step lands on the estimate itself
            x_next = x0_hat
        else:
            h = lam(sig[i + 1]) - lam(sig[i])
            D = x0_hat
            if prev_x0 is not None:
                r = (lam(sig[i]) - lam(sig[i - 1])) / h
                D = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * prev_x0
            x_next = (sig[i + 1] / sig[i]) * x - torch.expm1(-h) * D
        x, prev_x0 = x_next, x0_hat
        if callback:
            x = _call(callback, i, t, x, x0_hat)
    return x


# ─── flow matching (x_σ = (1−σ) z_0 + σ ε, velocity model) ─────────────────────────────────────────

def sample_flow_euler(velocity: VelocityFn, x: Tensor, s: Schedule, *, callback: Callback = None) -> Tensor:
    """Euler's method on the flow ODE dx/dσ = v(x, σ), v = ε − z_0 (Lipman et al. 2023; SD3, Esser et al.
    2024): x_{i+1} = x_i + (σ_{i+1} − σ_i) v̂, from σ = 1 (pure noise) to 0. x̂₀ = x − σ v̂."""
    sig = s.sigmas
    for i, t in enumerate(s.timesteps):
        v = velocity(x, t)
        x0_hat = x - sig[i] * v
        x = x + (sig[i + 1] - sig[i]) * v
        if callback:
            x = _call(callback, i, t, x, x0_hat)
    return x


def run(name: str, model: Callable[[Tensor, Tensor], Tensor], latents: Tensor, s: Schedule, *,
        prediction_type: str = "epsilon", eta: float = 0.0, generator=None, callback: Callback = None) -> Tensor:
    """Run sampler `name` from `latents` (already in the sampler's space: noise·init_sigma, or noised
    image latents for img2img) and return z_0.

    model(z_t, t) -> the (guided) network's output, a prediction of `prediction_type` (see `denoisers`);
    `eps_model` and `x0_model` turn it into what the sampler's kind calls, and a flow sampler takes the
    velocity as it is. eta goes to the samplers that take it (DDIM)."""
    sampler = get_sampler(name)
    if (sampler.kind == "flow") != (prediction_type == "flow"):
        raise ValueError(f"sampler {name!r} cannot sample a model that predicts {prediction_type!r}: "
                         f"flow models (velocity) take {', '.join(FLOW_SAMPLERS)}, others {', '.join(SAMPLERS)}")
    if sampler.kind == "discrete":
        model = eps_model(model, s, prediction_type)
    elif sampler.kind == "sigma":
        model = x0_model(model, prediction_type)
    given = {"eta": eta, "generator": generator}
    return sampler.fn(model, latents, s, callback=callback, **{k: given[k] for k in sampler.options})


def eps_model(model: Callable[[Tensor, Tensor], Tensor], s: Schedule, prediction_type: str = "epsilon") -> EpsFn:
    """(z_t, t) -> ε̂ for the discrete samplers; a v or z₀ prediction gives (ε̂, x̂₀), both from the network's
    output with ᾱ_t from the training schedule, as diffusers computes them (exact at ᾱ_t = 0)."""
    if prediction_type == "epsilon":
        return model
    acp = s.alphas_cumprod

    def eps_x0(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        out, alpha_bar = model(z, t), acp[int(t)].item()
        return to_eps(out, z, alpha_bar, prediction_type), to_x0(out, z, alpha_bar, prediction_type)

    return eps_x0


def x0_model(model: Callable[[Tensor, Tensor], Tensor], prediction_type: str = "epsilon") -> DenoiseFn:
    """(x, σ, t) -> x̂₀ for the noise-level samplers, which work on x = z_t/√ᾱ_t: the network is called on
    z_t = x/√(σ²+1), with ᾱ = 1/(σ²+1); x̂₀ = x − σ ε̂ (k-diffusion's DiscreteEpsDDPMDenoiser), or straight
    from a v or z₀ prediction (at a zero-SNR schedule's σ ≈ 4096, x − σ ε̂ would cancel in float32)."""
    def denoise(x: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
        z_t = x / (sigma**2 + 1) ** 0.5  # back to the network's z_t scale
        if prediction_type == "epsilon":
            return x - sigma * model(z_t, t)
        return to_x0(model(z_t, t), z_t, 1 / (sigma.item() ** 2 + 1), prediction_type)

    return denoise


def add_noise(name: str, z0: Tensor, noise: Tensor, s: Schedule, i: int) -> Tensor:
    """z_0 noised to the level of step i, in the sampler's space: √ᾱ_t z_0 + √(1−ᾱ_t) ε for the
    discrete samplers (eq. 2), z_0 + σ_i ε for the noise-level ones, σ_i ε + (1−σ_i) z_0 for flow."""
    kind = get_sampler(name).kind
    if kind == "discrete":
        a = s.alphas_cumprod[int(s.timesteps[i])].to(z0.device)
        return (a.sqrt() * z0.float() + (1 - a).sqrt() * noise.float()).to(z0.dtype)
    sigma = s.sigmas[i].to(z0.device)
    return sigma * noise + (1.0 - sigma) * z0 if kind == "flow" else z0 + sigma * noise


# ─── the registry: one entry per sampler carries everything about it ──────────────────────────────

@dataclass(frozen=True)
class Sampler:
    name: str
    kind: str               # "discrete" (z_t space, ε model), "sigma" (x = z_t/√ᾱ space, x̂₀ model), "flow" (velocity)
    spacing: str            # diffusers' default timestep_spacing for this scheduler
    diffusers_class: str    # the scheduler this one reproduces
    label: str              # the name AUTOMATIC1111 writes in a picture's parameters ("Euler a"; + " Karras")
    fn: Callable[..., Tensor]       # sample_x(model, latents, schedule, *, callback, **options)
    schedule: Callable = discrete_timesteps  # (steps, config, spacing, karras) -> (t, σ's or None, init σ)
    options: tuple[str, ...] = ()   # what fn takes besides callback: "eta", "generator"
    stochastic: bool = False        # draws fresh noise every step
    alpha_to_one: bool = False      # diffusers' default set_alpha_to_one: ᾱ "before" t=0 is 1 (DDIM)
    zero_snr: bool = False          # takes a zero-terminal-SNR schedule (diffusers has rescale_betas_zero_snr)


SAMPLERS = {s.name: s for s in (
    Sampler("ddpm", "discrete", "leading", "DDPMScheduler", "DDPM", sample_ddpm, options=("generator",),
            stochastic=True, zero_snr=True),
    Sampler("ddim", "discrete", "leading", "DDIMScheduler", "DDIM", sample_ddim, options=("eta", "generator"),
            alpha_to_one=True, zero_snr=True),
    Sampler("pndm", "discrete", "leading", "PNDMScheduler", "PLMS", sample_pndm, plms_timesteps),
    Sampler("euler", "sigma", "linspace", "EulerDiscreteScheduler", "Euler", sample_euler, sigma_timesteps,
            zero_snr=True),
    Sampler("euler_a", "sigma", "linspace", "EulerAncestralDiscreteScheduler", "Euler a", sample_euler_a,
            sigma_timesteps, options=("generator",), stochastic=True, zero_snr=True),
    Sampler("heun", "sigma", "linspace", "HeunDiscreteScheduler", "Heun", sample_heun, sigma_timesteps),
    Sampler("lms", "sigma", "linspace", "LMSDiscreteScheduler", "LMS", sample_lms, sigma_timesteps),
    Sampler("dpmpp_2m", "sigma", "linspace", "DPMSolverMultistepScheduler", "DPM++ 2M", sample_dpmpp_2m,
            dpm_solver_timesteps, zero_snr=True),
    Sampler("lcm", "discrete", "leading", "LCMScheduler", "LCM", sample_lcm, lcm_timesteps, options=("generator",),
            stochastic=True, alpha_to_one=True, zero_snr=True),
)}

# Samplers of flow-matching models (SD3), which predict a velocity: apart, as no ε/v model can use them.
# "Euler Flow", not A1111/Forge's plain "Euler" (they tell flow models by the model): one label per sampler,
# so a picture's recorded label names one sampler when it is read back.
FLOW_SAMPLERS = {s.name: s for s in (
    Sampler("flow_euler", "flow", "linspace", "FlowMatchEulerDiscreteScheduler", "Euler Flow", sample_flow_euler,
            flow_timesteps),
)}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS and name not in FLOW_SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join([*SAMPLERS, *FLOW_SAMPLERS])}")
    return SAMPLERS[name] if name in SAMPLERS else FLOW_SAMPLERS[name]


def default_sampler(prediction_type: str) -> str:
    """What a model samples with when no sampler is named: DDIM, or Euler along the flow for a flow model."""
    return "flow_euler" if prediction_type == "flow" else "ddim"
