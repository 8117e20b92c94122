"""Score distillation sampling (minisd.sds): the surrogate's gradient is the SDS gradient, the U-Net is
outside the graph, and with the shipped tiny model a gray picture (2-D) and a gray blob (3-D) move
towards the prompt, as read by the shapes-world analyser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minisd import StableDiffusion, sds
from minisd.shapes.analyser import judge


@pytest.fixture(scope="module")
def pipe() -> StableDiffusion:
    return StableDiffusion.from_pretrained("tiny", device="cpu", dtype=torch.float32)


def test_surrogate_gradient_is_the_sds_gradient(pipe):
    """∂/∂z ½‖z − sg(z − g)‖² = g = w(t)(ε̂ − ε), eq. (20.5), with t and ε replayed from the same generator."""
    B, s = 2, 5.0
    z = torch.randn(B, 4, 16, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    cond, uncond = pipe.encode_prompt(["a red circle in the center", "a blue square on the left"], None, s)
    loss = sds.sds_loss(pipe, z, cond, uncond, guidance_scale=s, t_range=(0.02, 0.98),
                        generator=torch.Generator().manual_seed(7))
    (grad,) = torch.autograd.grad(loss, [z])

    replay = torch.Generator().manual_seed(7)  # sds_loss draws t, then ε
    t = torch.randint(20, 981, (B,), generator=replay)
    eps = torch.randn(z.shape, generator=replay)
    with torch.no_grad():
        alpha_bar = pipe.scheduler.alphas_cumprod()[t].view(B, 1, 1, 1)
        z_t = alpha_bar.sqrt() * z + (1 - alpha_bar).sqrt() * eps
        eps_c, eps_u = pipe.unet(z_t, t, cond), pipe.unet(z_t, t, uncond)
        want = (1 - alpha_bar) * (eps_u + s * (eps_c - eps_u) - eps)
    err = (grad - want).abs().max().item()
    print(f"[sds] max |autograd − w(t)(ε̂ − ε)| = {err:.2e} (|g| max {want.abs().max().item():.2f})")
    assert err < 1e-5 * want.abs().max().item()
    assert loss.item() == pytest.approx(0.5 * (want ** 2).sum().item(), rel=1e-5)


def test_the_unet_is_not_in_the_graph(pipe):
    """Backpropagation reaches the picture through the VAE encoder and never reaches the U-Net."""
    x = torch.zeros(1, 3, 64, 64, requires_grad=True)
    cond, uncond = pipe.encode_prompt("a red circle in the center", None, 100.0)
    loss = sds.sds_loss(pipe, sds.encode(pipe, x), cond, uncond, generator=torch.Generator().manual_seed(0))

    leaves, seen, todo = set(), set(), [loss.grad_fn]
    while todo:  # every tensor autograd would accumulate into
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        todo += [f for f, _ in fn.next_functions]
    assert id(x) in leaves
    assert leaves & {id(p) for p in pipe.vae.encoder.parameters()}
    assert not leaves & {id(p) for p in pipe.unet.parameters()}
    loss.backward()
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert x.grad.abs().sum() > 0
    pipe.vae.zero_grad(set_to_none=True)


@pytest.mark.parametrize("bad", [(0.5, 0.2), (-0.1, 0.5), (0.1, 1.5)])
def test_bad_t_range_is_refused(pipe, bad):
    cond, _ = pipe.encode_prompt("a red circle", None, 1.0)
    with pytest.raises(ValueError, match="t_range"):
        sds.sds_loss(pipe, torch.zeros(1, 4, 16, 16), cond, None, t_range=bad)


PROMPTS_2D = ["a red circle in the center", "a blue square on the left", "a green triangle at the top",
              "a yellow circle on the right", "a purple square at the bottom", "an orange circle in the center"]


def adherence(prompts: list[str], images: torch.Tensor) -> float:
    """The fraction of requested factors (colour, shape, position) the analyser finds right."""
    found = [judge(p, im.numpy()) for p, im in zip(prompts, images)]
    return sum(sum(j.values()) for j in found) / sum(len(j) for j in found)


def test_2d_sds_moves_a_gray_picture_towards_the_prompt(pipe):
    """Six prompts (6 colours, 3 shapes, 5 positions), 80 Adam steps on the pixels: adherence (colour,
    shape, position) goes 0 → 0.28 → 0.61 at steps 0, 40, 80 with this seed."""
    run = sds.optimise_image(pipe, PROMPTS_2D, steps=80, every=40, generator=torch.Generator().manual_seed(0))
    scores = [adherence(PROMPTS_2D, images) for images in run.images]
    print(f"[sds] 2-D adherence at steps {run.steps}: {[round(s, 2) for s in scores]}")
    assert scores[0] == 0.0
    assert scores[-1] >= 0.35
    assert np.isfinite(run.losses).all()


def test_the_renderer_is_differentiable_and_empty_space_is_background():
    scene = sds.VoxelScene(8)
    azimuths = torch.tensor([0.0, math.pi / 3])
    x = sds.render_views(scene, azimuths, size=16, samples=12)
    assert x.shape == (2, 3, 16, 16)
    x[:, 0].sum().backward()
    assert scene.density.grad.abs().sum() > 0 and scene.colour.grad.abs().sum() > 0
    assert torch.isfinite(scene.density.grad).all()
    with torch.no_grad():
        scene.density.fill_(-50.0)  # σ ≈ 0 everywhere: every ray sees the background
        empty = sds.render_views(scene, azimuths, size=16, samples=12, background=(0.5, -0.5, 0.0))
    assert torch.allclose(empty, torch.tensor([0.5, -0.5, 0.0]).view(1, 3, 1, 1).expand_as(empty), atol=1e-4)


def test_a_quarter_turn_of_the_scene_is_a_quarter_turn_of_the_view():
    """Rendering at azimuth φ + 90° equals rendering the grid turned 90° about the vertical axis at φ."""
    scene = sds.VoxelScene(8)
    with torch.no_grad():
        scene.density.normal_(generator=torch.Generator().manual_seed(0))
        scene.colour.normal_(generator=torch.Generator().manual_seed(1))
        turned = sds.VoxelScene(8)
        turned.density.copy_(torch.rot90(scene.density, 1, dims=(2, 4)))  # the bias is round
        turned.colour.copy_(torch.rot90(scene.colour, 1, dims=(2, 4)))
        a = sds.render_views(scene, torch.tensor([math.pi / 2]), size=16, samples=16)
        b = torch.cat([sds.render_views(turned, torch.tensor([0.0]), size=16, samples=16),
                       sds.render_views(turned, torch.tensor([math.pi]), size=16, samples=16)])
    assert min((a - b[0]).abs().max(), (a - b[1]).abs().max()) < 1e-4


def test_a_view_from_straight_above_is_a_level_view_of_the_grid_stood_on_its_side():
    """Elevation π/2 looks down the vertical axis: the same picture as a level view (azimuth 0) of the grid with
    its vertical and depth axes swapped and the new vertical flipped — G'(x, y, z) = G(x, z, −y)."""
    scene, turned = sds.VoxelScene(8), sds.VoxelScene(8)
    with torch.no_grad():
        scene.density.normal_(generator=torch.Generator().manual_seed(0))
        scene.colour.normal_(generator=torch.Generator().manual_seed(1))
        turned.density.copy_(scene.density.transpose(2, 3).flip(3))  # (1, C, D=z, H=y, W=x); the bias is round
        turned.colour.copy_(scene.colour.transpose(2, 3).flip(3))
        above = sds.render_views(scene, torch.tensor([0.0]), elevations=torch.tensor([math.pi / 2]),
                                 size=16, samples=16)
        level = sds.render_views(turned, torch.tensor([0.0]), size=16, samples=16)
        default = sds.render_views(scene, torch.tensor([0.3, 1.0]), size=16, samples=16)
        zero = sds.render_views(scene, torch.tensor([0.3, 1.0]), elevations=torch.zeros(2), size=16, samples=16)
    assert (above - level).abs().max() < 1e-5
    assert torch.equal(default, zero)
    with pytest.raises(ValueError, match="elevations"):
        sds.render_views(scene, torch.tensor([0.0, 1.0]), elevations=torch.zeros(3))


def test_training_views_stay_inside_the_azimuth_range(pipe, monkeypatch):
    """optimise_scene draws its training azimuths from azimuth_range; a reversed range is refused."""
    seen = []
    render = sds.render_views

    def spy(scene, azimuths, **kw):
        seen.append(azimuths.clone())
        return render(scene, azimuths, **kw)

    monkeypatch.setattr(sds, "render_views", spy)
    sds.optimise_scene(pipe, "a red circle", steps=3, views_per_step=4, show_views=2, every=3,
                       azimuth_range=(-0.5, 0.5), resolution=4, generator=torch.Generator().manual_seed(0))
    trained = torch.cat(seen[1:-1])  # the first and last calls draw the shown views
    assert trained.numel() == 12 and trained.min() >= -0.5 and trained.max() <= 0.5
    with pytest.raises(ValueError, match="azimuth_range"):
        sds.optimise_scene(pipe, "a red circle", steps=1, azimuth_range=(1.0, 0.0))


def test_3d_sds_makes_a_red_ball_seen_from_every_side(pipe):
    """40 steps of 2 random views each: every one of 6 evenly spaced views of the scene shows a red
    circle in the center (colour, shape, position all judged right), its centre clearly red."""
    prompt = "a red circle in the center"
    _, run = sds.optimise_scene(pipe, prompt, steps=40, views_per_step=2, show_views=6, every=40,
                                generator=torch.Generator().manual_seed(0))
    first, last = run.images[0], run.images[-1]
    centre = last[:, 24:40, 24:40].float().mean(dim=(1, 2))  # (views, 3)
    print(f"[sds] 3-D centre colour per view: {centre.round().int().tolist()}")
    assert not any(all(judge(prompt, im.numpy()).values()) for im in first)
    assert all(all(judge(prompt, im.numpy()).values()) for im in last)
    assert (centre[:, 0] > centre[:, 1] + 80).all() and (centre[:, 0] > centre[:, 2] + 80).all()
