"""The newer sampling options equal their diffusers counterparts step by step: the LCM sampler, flow-matching
Euler with a shift, "trailing" timestep spacing, a zero-terminal-SNR schedule with v-prediction, and
guidance rescale. Scheduler-level tests drive both sides with one fixed random model function; pipeline
tests use the SD 1.5 block layout at a small random size (conftest.TEST), fp32 on the CPU, relative max
difference <= 1e-3 at every step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import TEST, report

from minisd import SchedulerConfig, StableDiffusion
from minisd.diffusion import samplers
from minisd.diffusion.denoisers import rescale_guidance

diffusers = pytest.importorskip("diffusers")

PROMPT = "a red circle on the left"
ZERO_SNR = replace(TEST.scheduler, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                   timestep_spacing="trailing")


def fixed_model(seed: int = 0):
    """A deterministic stand-in for a network: (z, t) -> a bounded nonlinear function of both."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    return lambda z, t: torch.tanh(w * z + b * (float(t) / 1000)) + 0.1 * z


def diffusers_steps(scheduler, model, latents: torch.Tensor, steps: int, seed: int = 3) -> list[torch.Tensor]:
    """The latents after each step of a diffusers scheduler driven by `model`, as its pipelines drive it."""
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    out = []
    for t in scheduler.timesteps:
        z = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model(z, t), t, x, generator=g).prev_sample
        out.append(x)
    return out


def our_steps(name: str, config: SchedulerConfig, model, latents: torch.Tensor, steps: int, seed: int = 3):
    s = samplers.make_schedule(name, steps, config)
    out = []
    samplers.run(name, model, latents * s.init_sigma, s, prediction_type=config.prediction_type,
                 generator=torch.Generator().manual_seed(seed), callback=lambda i, t, z, x0: out.append(z))
    return s, in_diffusers_space(name, s, out)


def in_diffusers_space(name: str, s: samplers.Schedule, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """diffusers' DPM-Solver keeps z_t = x/√(σ²+1) where minisd's keeps x: the same points, rescaled."""
    if name != "dpmpp_2m":
        return steps
    return [x / (s.sigmas[i + 1] ** 2 + 1) ** 0.5 for i, x in enumerate(steps)]


def compare_steps(what: str, ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        report(f"{what}, step {i + 1}/{len(ref)}", a, b, 1e-3)


def latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# ─── scheduler level: schedules exactly equal, latents step by step ───────────────────────────────

@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_matches_lcm_scheduler(steps):
    ref = diffusers.LCMScheduler.from_config(TEST.scheduler.to_diffusers("LCMScheduler"))
    model = fixed_model()
    s, mine = our_steps("lcm", TEST.scheduler, model, latents(), steps)
    theirs = diffusers_steps(ref, model, latents(), steps)
    assert torch.equal(s.timesteps, ref.timesteps.float())
    compare_steps(f"lcm {steps} steps (timesteps {s.timesteps.int().tolist()})", mine, theirs)


def test_lcm_schedule_limits():
    with pytest.raises(ValueError, match="lcm takes 1 to 50 steps"):
        samplers.make_schedule("lcm", 51, TEST.scheduler)


def test_flow_euler_matches_flow_match_scheduler():
    config = SchedulerConfig(prediction_type="flow", shift=3.0)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    model = fixed_model(1)
    s, mine = our_steps("flow_euler", config, model, latents(1), 10)
    theirs = diffusers_steps(ref, model, latents(1), 10)
    assert torch.equal(s.timesteps, ref.timesteps) and torch.equal(s.sigmas, ref.sigmas)
    compare_steps("flow_euler shift 3.0", mine, theirs)


def test_flow_samplers_take_flow_models_only():
    s = samplers.make_schedule("flow_euler", 4, SchedulerConfig(prediction_type="flow"))
    with pytest.raises(ValueError, match="flow_euler"):
        samplers.run("flow_euler", fixed_model(), latents(), s, prediction_type="epsilon")
    s = samplers.make_schedule("euler", 4, TEST.scheduler)
    with pytest.raises(ValueError, match="'flow'"):
        samplers.run("euler", fixed_model(), latents(), s, prediction_type="flow")
    assert SchedulerConfig.from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}) == \
        SchedulerConfig(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        prediction_type="flow", steps_offset=0, set_alpha_to_one=None, shift=3.0)


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_trailing_spacing_schedules_match(name):
    config = replace(TEST.scheduler, timestep_spacing="trailing")
    ref = getattr(diffusers, samplers.SAMPLERS[name].diffusers_class).from_config(config.to_diffusers(name))
    ref.set_timesteps(10)
    s = samplers.make_schedule(name, 10, config)
    if name != "lcm":  # LCM has its own schedule, whatever the spacing
        assert s.timesteps[0] == 999
    ref_t = ref.timesteps.float()
    if name == "heun":  # diffusers lists Heun's timesteps once per model call; ours once per step
        ref_t = torch.cat([ref_t[:1], ref_t[1::2]])
    assert torch.equal(s.timesteps, ref_t)
    if s.sigmas is not None:
        ref_sigmas = ref.sigmas if name != "heun" else torch.cat([ref.sigmas[:1], ref.sigmas[1::2]])
        assert torch.allclose(s.sigmas, ref_sigmas.float(), rtol=1e-6, atol=0)
        if name != "dpmpp_2m":  # diffusers' DPM-Solver starts from z_T = noise; ours from x_T = √(σ²+1) z_T
            assert s.init_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


def test_zero_snr_schedule_is_diffusers_and_ends_at_pure_noise():
    ref = diffusers.DDIMScheduler.from_config(ZERO_SNR.to_diffusers("DDIMScheduler"))
    assert torch.equal(ZERO_SNR.betas(), ref.betas)
    assert ZERO_SNR.alphas_cumprod()[-1] == 0 and torch.equal(ZERO_SNR.alphas_cumprod(), ref.alphas_cumprod)
    assert ZERO_SNR.alphas_cumprod()[0] == pytest.approx(TEST.scheduler.alphas_cumprod()[0].item(), rel=1e-6)


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "dpmpp_2m", "ddpm", "lcm"])
def test_zero_snr_v_prediction_step_by_step(name):
    cls = getattr(diffusers, samplers.SAMPLERS[name].diffusers_class)
    ref = cls.from_config(ZERO_SNR.to_diffusers(name))
    model = fixed_model(2)
    s, mine = our_steps(name, ZERO_SNR, model, latents(2), 6)
    theirs = diffusers_steps(ref, model, latents(2), 6)
    assert torch.equal(s.timesteps, ref.timesteps.float())
    if s.sigmas is not None:  # within an ulp: σ = √((1−ᾱ)/ᾱ) in numpy, diffusers' in torch (σ_max 4095.9998 vs 4096)
        assert torch.allclose(s.sigmas, ref.sigmas.float(), rtol=1e-7, atol=0)
    compare_steps(f"zero-SNR v-prediction {name} (t {s.timesteps.int().tolist()})", mine, theirs)


def test_zero_snr_refused_where_diffusers_has_none():
    with pytest.raises(ValueError, match="'pndm' has no zero-terminal-SNR"):
        samplers.make_schedule("pndm", 10, ZERO_SNR)


def test_guidance_rescale_is_diffusers_rescale_noise_cfg():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        rescale_noise_cfg,
    )

    g = torch.Generator().manual_seed(0)
    guided, cond = 3 * torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    report("rescale_guidance 0.7", rescale_guidance(guided, cond, 0.7), rescale_noise_cfg(guided, cond, 0.7), 1e-6)


# ─── pipeline level: the whole loop against diffusers' StableDiffusionPipeline ──────────────────────

def pipelines(config: SchedulerConfig, tokenizer, tmp_path_factory, seed: int = 0):
    pipe = StableDiffusion.from_config(replace(TEST, scheduler=config), tokenizer, seed=seed)
    folder = tmp_path_factory.mktemp("pipe")
    pipe.save_pretrained(folder)
    ours = StableDiffusion.from_pretrained(folder, device="cpu")
    ours.progress = False
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ours, ref, folder


@pytest.fixture(scope="module")
def trailing(tokenizer, tmp_path_factory):
    return pipelines(replace(TEST.scheduler, timestep_spacing="trailing"), tokenizer, tmp_path_factory)


@pytest.fixture(scope="module")
def zero_snr(tokenizer, tmp_path_factory):
    return pipelines(ZERO_SNR, tokenizer, tmp_path_factory, seed=2)


def run_both(pipes, name: str, steps: int = 6, **kwargs):
    """Both pipelines' latents after every step, from the same latents and generator."""
    ours, ref, folder = pipes
    ref.scheduler = getattr(diffusers, samplers.SAMPLERS[name].diffusers_class).from_pretrained(folder,
                                                                                               subfolder="scheduler")
    mine, theirs = [], []

    def record(pipe, i, t, kw):
        theirs.append(kw["latents"].clone())
        return kw

    common = dict(num_inference_steps=steps, latents=latents(5), output_type="latent", **kwargs)
    ref(PROMPT, generator=torch.Generator().manual_seed(7), callback_on_step_end=record, **common)
    ours(PROMPT, sampler=name, generator=torch.Generator().manual_seed(7),
         callback=lambda i, t, z: mine.append(z.clone()), **common)
    if name == "heun":  # diffusers calls back after each model call: a step ends on the second (the last: one)
        theirs = theirs[1::2] + theirs[-1:]
    return in_diffusers_space(name, samplers.make_schedule(name, steps, ours.scheduler), mine), theirs


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_trailing_pipeline_step_by_step(name, trailing):
    mine, theirs = run_both(trailing, name)
    compare_steps(f"txt2img trailing {name}", mine, theirs)


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_zero_snr_v_prediction_pipeline_step_by_step(name, zero_snr):
    mine, theirs = run_both(zero_snr, name, guidance_scale=7.5)
    compare_steps(f"txt2img zero-SNR v-prediction trailing {name}", mine, theirs)


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_guidance_rescale_pipeline_step_by_step(name, zero_snr, trailing):
    for pipes, what in ((zero_snr, "zero-SNR v-prediction"), (trailing, "epsilon")):
        mine, theirs = run_both(pipes, name, guidance_scale=7.5, guidance_rescale=0.7)
        compare_steps(f"txt2img guidance_rescale 0.7 {what} {name}", mine, theirs)
        plain, _ = run_both(pipes, name, guidance_scale=7.5)
        assert (plain[-1] - mine[-1]).abs().max() > 1e-3  # the option does something


def test_lcm_pipeline_step_by_step(trailing):
    mine, theirs = run_both(trailing, "lcm", steps=4, guidance_scale=1.5)
    compare_steps("txt2img lcm 4 steps, guidance 1.5", mine, theirs)


def test_guidance_rescale_out_of_range(trailing):
    with pytest.raises(ValueError, match="guidance_rescale"):
        trailing[0](PROMPT, num_inference_steps=2, guidance_rescale=1.5, output_type="latent")
