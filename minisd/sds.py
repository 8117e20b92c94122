"""Score distillation sampling (Poole et al. 2022, "DreamFusion: Text-to-3D using 2D Diffusion"):
a frozen text-to-image model used as a loss, for any picture a differentiable function can draw.
Notebook 20 derives it; the equation numbers are the notebook's.

A picture x = g(θ) (pixels, latents, or a 3-D scene's render) should look like the prompt y. Take its
latent z = E(x) (SD diffuses latents, so the loss lives there), a timestep t ~ U[t_min, t_max], noise
ε ~ N(0, I), and noise it as in training (DDPM, eq. 4 of Ho et al. 2020):

    z_t = √ᾱ_t z + √(1 − ᾱ_t) ε                                                      (20.1)

The diffusion loss for that z is

    L(θ) = E_t,ε[ w(t) ‖ε̂_φ(z_t; y, t) − ε‖² ] / 2                                     (20.2)

and its exact gradient is

    ∇_θ L = E[ w(t) (ε̂_φ − ε) (∂ε̂_φ/∂z_t) (∂z_t/∂z) (∂z/∂θ) ],                        (20.3)

whose U-Net Jacobian ∂ε̂_φ/∂z_t is expensive and, at small noise, poorly conditioned. DreamFusion drops
it (their eq. 3), and the √ᾱ_t of ∂z_t/∂z with it (absorbed into w):

    ∇_θ L_SDS = E[ w(t) (ε̂_φ(z_t; y, t) − ε) ∂z/∂θ ],      w(t) = 1 − ᾱ_t = σ_t²    (20.4)

— the residual of the denoiser pushes z towards pictures the model finds likely for y. ε̂ is the
classifier-free guided prediction (Ho & Salimans 2021):  ε̂ = ε̂(z_t; ∅) + s (ε̂(z_t; y) − ε̂(z_t; ∅)),
with a large s (DreamFusion uses s = 100: mode-seeking, sharp and saturated rather than diverse).

Autograd computes (20.4) from a surrogate. With g = w(t)(ε̂ − ε) computed without a graph (sg: stop-gradient),

    L_sur(z) = ½ ‖z − sg(z − g)‖²    ⇒    ∂L_sur/∂z = z − (z − g) = g                  (20.5)

exactly, so `L_sur.backward()` sends g back through E and the renderer and never through the U-Net.
(The value of L_sur is ½‖g‖², a progress signal, not the diffusion loss.)

Entry points: `sds_loss` (the surrogate (20.5) for latents z), `sds_grad` (g itself), `optimise_image`
(2-D: a picture from gray to the prompt), `VoxelScene` + `render_views` + `optimise_scene` (3-D: a 16³
grid of density and colour, ray-marched orthographically (20.6) from azimuths around the vertical axis,
and for a look at what training never saw, from any elevation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pipeline import StableDiffusion

GRAY = (0.0, 0.0, 0.0)        # the middle of [-1, 1]: where a 2-D run starts
LIGHT = (0.92, 0.92, 0.92)    # a near-white background for 3-D renders ([-1, 1]; the shapes world's white)


# ─── the loss ──────────────────────────────────────────────────────────────────────────────────────

def check_t_range(t_range: tuple[float, float]) -> None:
    lo, hi = t_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"t_range must be (lo, hi) with 0 <= lo <= hi <= 1 (fractions of the schedule), got {t_range}")


def guided_eps(pipe: StableDiffusion, z_t: Tensor, t: Tensor, cond: Tensor, uncond: Tensor | None,
               guidance_scale: float) -> Tensor:
    """ε̂(z_t; y, t) with classifier-free guidance, both branches in one batch; ε for any prediction type."""
    B = z_t.shape[0]
    if uncond is None or guidance_scale == 1.0:
        out = pipe.unet(z_t.to(pipe.dtype), t, cond).to(z_t.dtype)
    else:
        out_u, out_c = pipe.unet(torch.cat([z_t, z_t]).to(pipe.dtype), torch.cat([t, t]),
                                 torch.cat([uncond, cond])).to(z_t.dtype).chunk(2)
        out = out_u + guidance_scale * (out_c - out_u)
    if pipe.scheduler.prediction_type == "epsilon":
        return out
    alpha_bar = pipe.scheduler.alphas_cumprod().to(z_t.device)[t].view(B, 1, 1, 1).to(z_t.dtype)
    if pipe.scheduler.prediction_type == "v_prediction":  # v = √ᾱ ε − √(1−ᾱ) z  ⇒  ε = √ᾱ v + √(1−ᾱ) z_t
        return alpha_bar.sqrt() * out + (1 - alpha_bar).sqrt() * z_t
    raise ValueError(f"prediction_type {pipe.scheduler.prediction_type!r} is not supported; "
                     "expected 'epsilon' or 'v_prediction'")


@torch.no_grad()
def sds_grad(pipe: StableDiffusion, z: Tensor, cond: Tensor, uncond: Tensor | None, t: Tensor, eps: Tensor,
             guidance_scale: float = 100.0) -> Tensor:
    """g = w(t) (ε̂(z_t; y, t) − ε), eq. (20.4), for latents z (B, 4, h, w), timesteps t (B,) and noise ε."""
    alpha_bar = pipe.scheduler.alphas_cumprod().to(z.device)[t].view(-1, 1, 1, 1).to(z.dtype)
    z_t = alpha_bar.sqrt() * z + (1 - alpha_bar).sqrt() * eps           # eq. (20.1)
    eps_hat = guided_eps(pipe, z_t, t, cond, uncond, guidance_scale)
    return (1 - alpha_bar) * (eps_hat - eps)                             # w(t) = 1 − ᾱ_t


def sds_loss(pipe: StableDiffusion, z: Tensor, cond: Tensor, uncond: Tensor | None = None, *,
             guidance_scale: float = 100.0, t_range: tuple[float, float] = (0.02, 0.98),
             generator: torch.Generator | None = None) -> Tensor:
    """The surrogate ½‖z − sg(z − g)‖² of eq. (20.5), summed over the batch: its gradient with respect to z
    is g = w(t)(ε̂ − ε) exactly, and the U-Net is not in its graph. z: scaled latents (B, 4, h, w);
    cond/uncond: `pipe.encode_prompt` output for B prompts (uncond None: no guidance). One t per sample,
    drawn uniformly from t_range (fractions of the training schedule), and ε drawn from `generator`."""
    check_t_range(t_range)
    n = pipe.scheduler.num_train_timesteps
    t = torch.randint(int(t_range[0] * n), int(t_range[1] * n) + 1, (z.shape[0],), generator=generator)
    t = t.clamp(max=n - 1).to(z.device)
    eps = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
    g = sds_grad(pipe, z.detach(), cond, uncond, t, eps, guidance_scale)
    target = (z - g).detach()
    return 0.5 * ((z - target) ** 2).sum()


def encode(pipe: StableDiffusion, x: Tensor) -> Tensor:
    """Pixels x in [-1, 1], (B, 3, H, W) -> scaled latents z (B, 4, H/f, W/f): the mean of q(z|x), with a graph."""
    return pipe.vae.encode(x.to(pipe.vae.dtype)).mean.to(x.dtype) * pipe.vae.scaling_factor


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), for PIL and the shapes-world analyser."""
    return ((x.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


# ─── 2-D: a picture ────────────────────────────────────────────────────────────────────────────────

@dataclass
class Trajectory:
    """What an SDS run leaves: pictures (uint8, (B, H, W, 3)) every `every` steps, and the surrogate loss."""
    steps: list[int] = field(default_factory=list)
    images: list[Tensor] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def optimise_image(pipe: StableDiffusion, prompt: str | list[str], *, steps: int = 150, lr: float = 0.03,
                   guidance_scale: float = 100.0, t_range: tuple[float, float] = (0.02, 0.98),
                   init: tuple[float, float, float] = GRAY, size: int | None = None, every: int = 25,
                   generator: torch.Generator | None = None) -> Trajectory:
    """Optimise pictures' pixels from a flat colour (gray) with Adam on the SDS gradient through the VAE
    encoder, one picture per prompt. Pixels are tanh(θ) so they stay in [-1, 1]."""
    if steps < 1 or every < 1:
        raise ValueError(f"steps and every must be >= 1, got steps={steps}, every={every}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    size = size or pipe.image_size
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, None, guidance_scale)
    colour = torch.tensor(init, device=pipe.device).clamp(-0.99, 0.99).view(1, 3, 1, 1)
    theta = torch.atanh(colour).expand(len(prompts), 3, size, size).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    out = Trajectory()
    for step in range(steps + 1):
        x = torch.tanh(theta)
        if step % every == 0 or step == steps:
            out.steps.append(step)
            out.images.append(to_uint8(x))
        if step == steps:
            break
        loss = sds_loss(pipe, encode(pipe, x), cond, uncond, guidance_scale=guidance_scale, t_range=t_range,
                        generator=generator)
        theta.grad, = torch.autograd.grad(loss, [theta])  # only θ: the frozen VAE's parameters get no .grad
        opt.step()
        out.losses.append(loss.item())
    return out


# ─── 3-D: a tiny scene ─────────────────────────────────────────────────────────────────────────────

class VoxelScene(nn.Module):
    """A grid of density σ ≥ 0 and colour c ∈ [-1, 1] filling the cube [-1, 1]³ (trilinear in between).

    Parameters are unconstrained: σ = softplus(density + bias), c = tanh(colour). The fixed bias is
    DreamFusion's initial density blob, lower far from the centre, so empty space starts transparent
    and the optimiser grows an object from the middle rather than fog from the walls.
    """

    def __init__(self, resolution: int = 16, blob: float = 4.0):
        super().__init__()
        if resolution < 2:
            raise ValueError(f"resolution must be >= 2 voxels per side, got {resolution}")
        r = torch.linspace(-1, 1, resolution)
        zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
        radius = (xx ** 2 + yy ** 2 + zz ** 2).sqrt()
        self.register_buffer("bias", (blob * (1 - 2 * radius) - 2).view(1, 1, *radius.shape))  # (1, 1, D, H, W)
        self.density = nn.Parameter(torch.zeros(1, 1, resolution, resolution, resolution))
        self.colour = nn.Parameter(torch.zeros(1, 3, resolution, resolution, resolution))  # gray: tanh(0) = 0

    def fields(self) -> Tensor:
        """(1, 4, D, H, W): σ and the colour in [-1, 1], ready to sample."""
        return torch.cat([F.softplus(self.density + self.bias), torch.tanh(self.colour)], dim=1)


def camera_rotation(azimuths: Tensor, elevations: Tensor) -> Tensor:
    """(B, 3, 3) matrices taking view coordinates (x right, y down, d into the screen) to cube coordinates
    (y is the vertical axis, pointing down): tilt the camera by the elevation (radians, > 0: above the
    equator, looking down), then turn it about the vertical axis by the azimuth."""
    cos, sin = azimuths.cos(), azimuths.sin()
    cos_e, sin_e = elevations.cos(), elevations.sin()
    zero, one = torch.zeros_like(cos), torch.ones_like(cos)
    turn = torch.stack([torch.stack([cos, zero, sin], -1), torch.stack([zero, one, zero], -1),
                        torch.stack([-sin, zero, cos], -1)], -2)                         # about y
    tilt = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, cos_e, sin_e], -1),
                        torch.stack([zero, -sin_e, cos_e], -1)], -2)                     # about x: d -> (0, sin, cos)
    return turn @ tilt


def render_views(scene: VoxelScene, azimuths: Tensor, *, size: int = 64, samples: int = 32,
                 background: tuple[float, float, float] = LIGHT, extent: float = 1.2,
                 elevations: Tensor | None = None) -> Tensor:
    """Orthographic emission–absorption renders (B, 3, size, size) in [-1, 1], one per azimuth (radians,
    a rotation about the vertical axis) and elevation (radians, default 0: level with the cube's centre;
    π/2: from straight above). Each pixel's ray crosses the cube front to back in `samples`
    steps of length δ; with α_i = 1 − exp(−σ_i δ) and transmittance T_i = Π_{j<i} (1 − α_j)
    (Max 1995; NeRF, Mildenhall et al. 2020, eq. 3), the pixel is Σ_i T_i α_i c_i + T_{N+1} · background (20.6).
    `extent` is the half-width of the view in cube units (1.2: a margin of background around it)."""
    B = azimuths.shape[0]
    if elevations is None:
        elevations = torch.zeros_like(azimuths)
    if elevations.shape != azimuths.shape:
        raise ValueError(f"elevations must have the azimuths' shape {tuple(azimuths.shape)}, "
                         f"got {tuple(elevations.shape)}")
    rotation = camera_rotation(azimuths, elevations) * extent                           # (B, 3, 3)
    affine = torch.cat([rotation, torch.zeros(B, 3, 1)], dim=-1).to(azimuths.device)  # (B, 3, 4)
    grid = F.affine_grid(affine, [B, 4, samples, size, size], align_corners=False)      # (B, N, H, W, 3)
    fields = F.grid_sample(scene.fields().expand(B, -1, -1, -1, -1), grid, align_corners=True)  # (B, 4, N, H, W)
    sigma, colour = fields[:, :1], fields[:, 1:]
    delta = 2 * extent / samples
    alpha = 1 - torch.exp(-sigma * delta)                                                # (B, 1, N, H, W)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha], dim=2), dim=2)
    x = (trans[:, :, :-1] * alpha * colour).sum(dim=2)                                  # (B, 3, H, W)
    bg = torch.tensor(background, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x + trans[:, :, -1] * bg


def optimise_scene(pipe: StableDiffusion, prompt: str, *, steps: int = 200, views_per_step: int = 4,
                   lr: float = 0.1, guidance_scale: float = 100.0, t_range: tuple[float, float] = (0.02, 0.98),
                   resolution: int = 16, background: tuple[float, float, float] = LIGHT, show_views: int = 4,
                   every: int = 50, azimuth_range: tuple[float, float] = (0.0, 2 * math.pi),
                   generator: torch.Generator | None = None) -> tuple[VoxelScene, Trajectory]:
    """DreamFusion in miniature: optimise a `VoxelScene` so that its render from every random azimuth in
    `azimuth_range` (radians; default the whole circle), each step `views_per_step` of them, gets the SDS
    gradient for `prompt`. The trajectory holds renders from `show_views` azimuths evenly spaced around the
    whole circle every `every` steps."""
    if steps < 1 or every < 1 or views_per_step < 1 or show_views < 1:
        raise ValueError(f"steps, every, views_per_step and show_views must be >= 1, got "
                         f"{steps}, {every}, {views_per_step}, {show_views}")
    lo, hi = azimuth_range
    if not lo <= hi:
        raise ValueError(f"azimuth_range must be (lo, hi) with lo <= hi (radians), got {azimuth_range}")
    scene = VoxelScene(resolution).to(pipe.device)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, None, guidance_scale)
    cond = cond.expand(views_per_step, -1, -1)
    uncond = None if uncond is None else uncond.expand(views_per_step, -1, -1)
    shown = torch.arange(show_views, device=pipe.device) * (2 * math.pi / show_views)
    opt = torch.optim.Adam(scene.parameters(), lr=lr)
    out = Trajectory()
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            with torch.no_grad():
                out.steps.append(step)
                out.images.append(to_uint8(render_views(scene, shown, size=pipe.image_size, background=background)))
        if step == steps:
            break
        azimuths = (lo + torch.rand(views_per_step, generator=generator) * (hi - lo)).to(pipe.device)
        x = render_views(scene, azimuths, size=pipe.image_size, background=background)
        loss = sds_loss(pipe, encode(pipe, x), cond, uncond, guidance_scale=guidance_scale, t_range=t_range,
                        generator=generator)
        grads = torch.autograd.grad(loss, list(scene.parameters()))  # only the scene: the VAE stays untouched
        for p, g in zip(scene.parameters(), grads):
            p.grad = g
        opt.step()
        out.losses.append(loss.item())
    return scene, out
