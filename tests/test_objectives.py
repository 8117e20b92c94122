"""The three training targets (ε, v, flow velocity) against their definitions and diffusers' own, and
`minisd train --prediction-type ... --init-from` producing models the ordinary loader and diffusers read."""

from __future__ import annotations

import json

import pytest
import torch

from minisd import StableDiffusion
from minisd.cli import model_sampler
from minisd.diffusion import objectives
from minisd.diffusion.schedules import SchedulerConfig
from minisd.shapes.train import main as train_main

from conftest import report


def test_v_target_is_diffusers_get_velocity():
    from diffusers import DDIMScheduler

    cfg = SchedulerConfig(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    ref = DDIMScheduler.from_config(cfg.to_diffusers())
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 250, 500, 998, 999])
    alpha_bar = cfg.alphas_cumprod()
    z_t, v = objectives.noised_and_target("v_prediction", z0, eps, t, alpha_bar)
    ref_v, ref_z = ref.get_velocity(z0, eps, t), ref.add_noise(z0, eps, t)
    report("v target vs DDIMScheduler.get_velocity", v, ref_v, rtol=1e-6)
    report("v noised vs DDIMScheduler.add_noise", z_t, ref_z, rtol=1e-6)
    assert torch.allclose(v[-1], -z0[-1], atol=1e-6)  # zero terminal SNR: z_T is pure noise and v = −z₀


def test_each_target_gives_back_z0_and_eps():
    """Whatever the target, a perfect prediction recovers z₀ and ε: the samplers' conversions undo it."""
    from minisd.diffusion.denoisers import to_eps, to_x0

    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    alpha_bar = SchedulerConfig().alphas_cumprod()
    for kind in ("epsilon", "v_prediction"):
        for t in (5, 400, 990):
            z_t, y = objectives.noised_and_target(kind, z0, eps, torch.full((3,), t), alpha_bar)
            a = alpha_bar[t].item()
            assert torch.allclose(to_x0(y, z_t, a, kind), z0, atol=1e-3), (kind, t)
            assert torch.allclose(to_eps(y, z_t, a, kind), eps, atol=1e-3), (kind, t)
    t = torch.tensor([100.0, 500.0, 900.0])
    x, v = objectives.noised_and_target("flow", z0, eps, t, alpha_bar)
    sigma = (t / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(x - sigma * v, z0, atol=1e-5)  # straight line: z₀ = x_σ − σ v
    assert torch.allclose(x + (1 - sigma) * v, eps, atol=1e-5)  # and ε = x_σ + (1 − σ) v


def test_flow_timesteps_are_logit_normal_and_shifted():
    g = torch.Generator().manual_seed(0)
    t = objectives.draw_timesteps("flow", 20_000, 1000, g)
    sigma = t / 1000
    logit = torch.log(sigma / (1 - sigma))
    assert 0 < sigma.min() and sigma.max() < 1
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03  # sigmoid of N(0, 1)
    shifted = objectives.draw_timesteps("flow", 20_000, 1000, torch.Generator().manual_seed(0), shift=3.0) / 1000
    assert torch.allclose(shifted, 3 * sigma / (1 + 2 * sigma), atol=1e-6) and shifted.median() > sigma.median()
    ints = objectives.draw_timesteps("epsilon", 1000, 1000, g)
    assert ints.dtype == torch.int64 and 0 <= ints.min() and ints.max() < 1000


def test_min_snr_weights_per_target():
    alpha_bar = SchedulerConfig(rescale_betas_zero_snr=True).alphas_cumprod()
    t = torch.tensor([0, 300, 999])
    s = alpha_bar[t] / (1 - alpha_bar[t])
    w_eps = objectives.loss_weights("epsilon", t, alpha_bar, 5.0)
    w_v = objectives.loss_weights("v_prediction", t, alpha_bar, 5.0)
    assert torch.allclose(w_eps[:2], s[:2].clamp(max=5) / s[:2]) and w_eps[2] == 1  # no 0/0 at SNR 0
    assert torch.allclose(w_v, s.clamp(max=5) / (s + 1)) and w_v[2] == 0
    assert objectives.loss_weights("flow", t, alpha_bar, 5.0) is None
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        objectives.draw_timesteps("x0", 4, 1000)


def test_scheduler_configs_diffusers_reads_the_same_way():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    v = SchedulerConfig(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    written = v.to_diffusers()
    assert written["_class_name"] == "DDIMScheduler"
    ref = DDIMScheduler.from_config(written)
    assert ref.config.prediction_type == "v_prediction" and ref.config.rescale_betas_zero_snr
    assert torch.allclose(ref.alphas_cumprod, v.alphas_cumprod()) and ref.alphas_cumprod[-1] == 0
    flow = SchedulerConfig(prediction_type="flow", shift=2.0)
    written = flow.to_diffusers()
    assert written == {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 2.0}
    assert FlowMatchEulerDiscreteScheduler.from_config(written).config.shift == 2.0
    read = SchedulerConfig.from_diffusers(written)  # what a flow model has: no betas to compare
    assert (read.prediction_type, read.shift, read.num_train_timesteps) == ("flow", 2.0, 1000)


SHORT = ["--n-images", "60", "--unet-steps", "3", "--unet-batch", "4", "--warmup", "1", "--sample-steps", "2",
         "--unet-refine-steps", "0"]


@pytest.mark.parametrize("objective, scheduler_class, sampler", [("v_prediction", "DDIMScheduler", "ddim"),
                                                                 ("flow", "FlowMatchEulerDiscreteScheduler", "flow_euler")])
def test_train_another_objective_from_a_finished_model(tiny_folder, tmp_path, objective, scheduler_class, sampler):
    out, work = tmp_path / "model", tmp_path / "work"
    train_main(["unet", "--init-from", str(tiny_folder), "--prediction-type", objective, "--out", str(out),
                "--work", str(work), *SHORT])
    log = (work / "log.txt").read_text()
    assert f"starts the {objective} U-Net" in log and "vae:" not in log and "clip:" not in log  # reused, not trained
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == scheduler_class
    pipe = StableDiffusion.from_pretrained(out, device="cpu")
    base = StableDiffusion.from_pretrained(tiny_folder, device="cpu")
    assert pipe.scheduler.prediction_type == objective
    for name in ("vae", "text_encoder"):  # the same VAE and text encoder, as fp16 keeps them (models ship in fp16)
        a, b = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(a[k], b[k].half().float()) for k in a), name
    record = json.loads((out / "training.json").read_text())
    assert record["command"] == "minisd train unet" and record["config"]["prediction_type"] == objective
    assert model_sampler(str(out)) == sampler  # the CLI's default, read before loading
    images = pipe("a red circle", num_inference_steps=3, seed=0, output_type="pt")  # the model's own sampler
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    if objective == "flow":
        with pytest.raises(ValueError, match="cannot sample a model that predicts 'flow'"):
            pipe("a red circle", num_inference_steps=2, sampler="ddim")


def test_init_from_must_be_a_model_folder(tmp_path):
    with pytest.raises(ValueError, match=r"^--init-from .*: not a model folder \(no model_index.json there\)"):
        train_main(["unet", "--init-from", str(tmp_path), "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")])
    with pytest.raises(ValueError, match=r"^--prediction-type must be one of 'epsilon', 'v_prediction', 'flow'"):
        train_main(["unet", "--prediction-type", "x0", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")])
    with pytest.raises(ValueError, match=r"^--flow-shift must be in \(0, 100\], got 0.0"):
        train_main(["unet", "--flow-shift", "0", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


def test_train_help_says_what_each_flag_does(capsys):
    for argv in (["--help"], ["lcm", "--help"]):
        with pytest.raises(SystemExit) as info:
            train_main(argv)
        assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--prediction-type" in out and '"v_prediction" (with a zero-terminal-SNR' in out
    assert "(default: 'epsilon')" in out and "(default: 5.0)" in out
    assert "pseudo-Huber's c" in out and "cosine to 10%" in out  # the comment in the config, % kept as written
