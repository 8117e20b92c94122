"""Noise schedules: how much noise the forward process adds at each of the N training timesteps.

The forward process adds Gaussian noise in N small steps (Ho et al. 2020, eq. 2):

    q(x_t | x_{t-1}) = N(√(1−β_t) x_{t-1}, β_t I)                                           (1)

and, with α_t = 1 − β_t and ᾱ_t = Π_{s≤t} α_s, jumps straight to any t in closed form (eq. 4):

    x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε,   ε ~ N(0, I)                                             (2)

The signal-to-noise ratio is SNR(t) = ᾱ_t / (1−ᾱ_t); samplers in the k-diffusion style use the
noise level σ_t = √((1−ᾱ_t)/ᾱ_t) = 1/√SNR(t) of the rescaled x_t/√ᾱ_t = x_0 + σ_t ε.   (3)

Timesteps are 0-based, t = 0 … N−1, as in diffusers and the SD checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_bool, check_float, check_int

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


@dataclass(frozen=True)
class SchedulerConfig:
    """The training schedule of a model (diffusers `scheduler/scheduler_config.json`)."""

    num_train_timesteps: int = 1000        # N
    beta_start: float = 0.00085            # β_1 (SD 1.x)
    beta_end: float = 0.012                # β_N (SD 1.x)
    beta_schedule: str = "scaled_linear"   # "linear" | "scaled_linear" | "squaredcos_cap_v2" (cosine)
    prediction_type: str = "epsilon"       # "epsilon" | "v_prediction" | "sample" | "flow" (a velocity, flow matching)
    steps_offset: int = 1                  # added to "leading" timesteps (SD 1.x: 1 -> 981, 961, ..., 1)
    timestep_spacing: str | None = None    # "leading" | "trailing" | "linspace"; None: each sampler's diffusers default
    set_alpha_to_one: bool | None = False  # DDIM/PNDM: ᾱ "before" t=0 is 1 (True) or ᾱ_0 (False); None: DDIM's default
    rescale_betas_zero_snr: bool = False   # Lin et al. 2024, alg. 1: ᾱ_{N−1} = 0, pure noise at the last step
    shift: float = 1.0                     # flow matching: σ -> shift·σ/(1 + (shift−1)·σ) (SD3 uses 3.0)

    def __post_init__(self):
        """Sane ranges before any table is built: N = 10⁹ would allocate gigabytes of betas."""
        name = "SchedulerConfig"
        check_int(name, "num_train_timesteps", self.num_train_timesteps, 1, 100_000)
        check_float(name, "beta_start", self.beta_start, 0.0, 0.999, lo_open=True)
        check_float(name, "beta_end", self.beta_end, 0.0, 0.999, lo_open=True)
        check_int(name, "steps_offset", self.steps_offset, 0, self.num_train_timesteps - 1)
        if self.set_alpha_to_one is not None:
            check_bool(name, "set_alpha_to_one", self.set_alpha_to_one)
        check_bool(name, "rescale_betas_zero_snr", self.rescale_betas_zero_snr)
        check_float(name, "shift", self.shift, 0.0, 1000.0, lo_open=True)
        if not isinstance(self.beta_schedule, str) or self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; known: {sorted(BETA_SCHEDULES)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if self.timestep_spacing not in (None, "leading", "trailing", "linspace"):
            raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}")

    @classmethod
    def from_diffusers(cls, cfg: dict) -> SchedulerConfig:
        if cfg.get("trained_betas") is not None:
            raise ValueError("schedulers with trained_betas are not supported")
        # absent keys: diffusers' scheduler defaults (so timestep_spacing / set_alpha_to_one stay per-sampler)
        flow = str(cfg.get("_class_name", "")).startswith("FlowMatch")  # a flow model's config names no prediction type
        return cls(num_train_timesteps=cfg.get("num_train_timesteps", 1000), beta_start=cfg.get("beta_start", 0.0001),
                   beta_end=cfg.get("beta_end", 0.02), beta_schedule=cfg.get("beta_schedule", "linear"),
                   prediction_type="flow" if flow else cfg.get("prediction_type", "epsilon"),
                   steps_offset=cfg.get("steps_offset", 0), timestep_spacing=cfg.get("timestep_spacing"),
                   set_alpha_to_one=cfg.get("set_alpha_to_one"),
                   rescale_betas_zero_snr=cfg.get("rescale_betas_zero_snr", False), shift=cfg.get("shift", 1.0))

    def diffusers_class(self) -> str:
        """The diffusers scheduler a saved model names: its own defaults read this config as minisd does
        (PNDM is SD 1.x's; PNDM has no zero-terminal-SNR option, DDIM has; a flow model's is FlowMatchEuler)."""
        if self.prediction_type == "flow":
            return "FlowMatchEulerDiscreteScheduler"
        return "DDIMScheduler" if self.rescale_betas_zero_snr else "PNDMScheduler"

    def to_diffusers(self, class_name: str | None = None) -> dict:
        class_name = self.diffusers_class() if class_name is None else class_name
        if self.prediction_type == "flow":  # FlowMatchEulerDiscreteScheduler's fields: no betas, no ᾱ
            return {"_class_name": class_name, "num_train_timesteps": self.num_train_timesteps, "shift": self.shift}
        out = {"_class_name": class_name, "num_train_timesteps": self.num_train_timesteps,
               "beta_start": self.beta_start, "beta_end": self.beta_end, "beta_schedule": self.beta_schedule,
               "prediction_type": self.prediction_type, "steps_offset": self.steps_offset,
               "clip_sample": False, "skip_prk_steps": True, "trained_betas": None}
        for key in ("timestep_spacing", "set_alpha_to_one"):  # absent means "the scheduler's default"
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.rescale_betas_zero_snr:  # written only when set: older configs stay as they were
            out["rescale_betas_zero_snr"] = True
        if self.shift != 1.0:
            out["shift"] = self.shift
        return out

    def betas(self) -> Tensor:
        if self.beta_schedule in ("squaredcos_cap_v2", "cosine"):  # defined by ᾱ(t); ignores beta_start/end
            betas = cosine_betas(self.num_train_timesteps)
        else:
            betas = BETA_SCHEDULES[self.beta_schedule](self.num_train_timesteps, self.beta_start, self.beta_end)
        return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def alphas_cumprod(self) -> Tensor:
        return alphas_cumprod(self.betas())


def linear_betas(n: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """β_t evenly spaced (DDPM: 1e-4 … 0.02 over 1000 steps)."""
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)


def scaled_linear_betas(n: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """√β_t evenly spaced, then squared: Stable Diffusion's schedule (LDM's "linear" with its own defaults)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2


def cosine_betas(n: int, max_beta: float = 0.999, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²((t/N + s)/(1 + s) · π/2), β_t = 1 − ᾱ_t/ᾱ_{t−1},
    clipped at 0.999 so the last step stays finite. (diffusers: "squaredcos_cap_v2")."""
    def f(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = [min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", alg. 1: shift and
    scale √ᾱ_t so that √ᾱ_{N−1} = 0 (SNR 0: the last step is pure noise, as the sampler's start is) and
    √ᾱ_0 keeps its value; back to β's. SD's schedule leaves ᾱ_{N−1} ≈ 0.0047, so a model never sees pure
    noise in training yet starts from it, and cannot make very dark or bright images. Used with v-prediction:
    at ᾱ = 0 an ε prediction says nothing about z₀."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])  # undo the cumulative product
    return 1 - alphas


BETA_SCHEDULES = {"linear": linear_betas, "scaled_linear": scaled_linear_betas,
                  "squaredcos_cap_v2": cosine_betas, "cosine": cosine_betas}


def alphas_cumprod(betas: Tensor) -> Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s): how much of x_0 is left in x_t (eq. 2)."""
    return torch.cumprod(1.0 - betas, dim=0)


def snr(alpha_bar: Tensor) -> Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t)."""
    return alpha_bar / (1.0 - alpha_bar)


def sigmas(alpha_bar: Tensor) -> Tensor:
    """σ_t = √((1 − ᾱ_t) / ᾱ_t), the noise level of x_t/√ᾱ_t (eq. 3)."""
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


def q_sample(x0: Tensor, t: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """Eq. 2: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, for a batch x0 (B, ...) and timesteps t (B,) or scalar."""
    a = alpha_bar.to(x0.device)[t].float()
    a = a.reshape(a.shape + (1,) * (x0.ndim - a.ndim))  # broadcast over C, H, W
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * eps.float()).to(x0.dtype)


def q_step(x_prev: Tensor, t: int, eps: Tensor, betas: Tensor) -> Tensor:
    """Eq. 1, one step of the chain: x_t = √(1−β_t) x_{t−1} + √β_t ε."""
    beta = betas[t]
    return (1 - beta).sqrt() * x_prev + beta.sqrt() * eps


def v_target(x0: Tensor, eps: Tensor, t: Tensor, alpha_bar: Tensor) -> Tensor:
    """The v-prediction target v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (Salimans & Ho 2022), used by SD 2.x 768."""
    a = alpha_bar.to(x0.device)[t].float()
    a = a.reshape(a.shape + (1,) * (x0.ndim - a.ndim))
    return (a.sqrt() * eps.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)
