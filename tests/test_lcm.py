"""Latent consistency models: the U-Net's guidance-scale input and its embedding equal diffusers', generation
with an LCM U-Net equals diffusers' LatentConsistencyModelPipeline, and `minisd train lcm` distils a model
that the loader reads and samples (a few steps on the small SD-1.5-layout model, random weights)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import TEST, report

from minisd import SchedulerConfig, StableDiffusion, UNet, UNetConfig
from minisd.cli import model_sampler
from minisd.diffusion.denoisers import guidance_scale_embedding, to_eps
from minisd.shapes.train import main as train_main
from minisd.shapes.train_lcm import DDIMSolver, LCMConfig, save_lcm_pipeline, student_unet, teacher_step

diffusers = pytest.importorskip("diffusers")

LCM_UNET = replace(TEST.unet, time_cond_proj_dim=16)
PROMPTS = ["a red circle on the left", "a large blue square at the top"]


def reference_unet(cfg: UNetConfig):
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        return diffusers.UNet2DConditionModel(**cfg.to_diffusers()).eval()


@pytest.mark.parametrize("dim", [256, 16, 15])
def test_guidance_scale_embedding_is_diffusers(dim):
    w = torch.tensor([0.0, 1.0, 2.5, 6.5, 8.0])  # 1000·w: angles up to 8000 rad
    ref = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    ours = guidance_scale_embedding(w, dim)
    report(f"guidance_scale_embedding dim {dim}", ours, ref, 0.0)
    assert torch.equal(ours, ref)


def test_unet_with_guidance_input_matches_diffusers():
    assert UNetConfig.from_diffusers(LCM_UNET.to_diffusers()) == LCM_UNET
    assert "time_cond_proj_dim" not in TEST.unet.to_diffusers()  # SD 1.x configs stay as they were
    ref = reference_unet(LCM_UNET)
    with torch.device("meta"):
        model = UNet(LCM_UNET)
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)  # diffusers' key names, no map
    assert ref.time_embedding.cond_proj.weight.shape == model.time_embedding.cond_proj.weight.shape == (32, 16)
    g = torch.Generator().manual_seed(1)
    z, context = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, 32, generator=g)
    t = torch.tensor([999, 500, 19])
    w_emb = guidance_scale_embedding(torch.tensor([2.0, 6.5, 8.0]), 16)
    with torch.no_grad():
        ours = model(z, t, context, timestep_cond=w_emb)
        report("unet with timestep_cond (LCM)", ours, ref(z, t, context, timestep_cond=w_emb).sample, 1e-4)
        report("unet without timestep_cond", model(z, t, context), ref(z, t, context).sample, 1e-4)
        assert (ours - model(z, t, context)).abs().max() > 1e-3  # the guidance input is read
    with pytest.raises(ValueError, match="time_cond_proj_dim is None"):
        reference = UNet(TEST.unet)
        reference(z, t, context, timestep_cond=w_emb)


ZERO_SNR_V = SchedulerConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")


@pytest.fixture(scope="module", params=["epsilon", "v, zero SNR"])
def lcm_folder(request, tokenizer, tmp_path_factory):
    """A random small LCM pipeline (cond_proj random, not zero), saved as `minisd train lcm` saves one: of an ε
    teacher, or of a v-prediction teacher on a zero-terminal-SNR schedule (data/tiny_v's)."""
    scheduler = TEST.scheduler if request.param == "epsilon" else ZERO_SNR_V
    pipe = StableDiffusion.from_config(replace(TEST, unet=LCM_UNET, scheduler=scheduler), tokenizer, seed=3)
    folder = tmp_path_factory.mktemp("lcm_pipe")
    save_lcm_pipeline(pipe, pipe.unet, folder)
    return folder


def test_lcm_pipeline_matches_diffusers(lcm_folder):
    """txt2img, 4 steps of the LCM sampler, the scale embedded: latents after every step and the pictures."""
    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(lcm_folder, safety_checker=None,
                                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    assert type(ref.scheduler).__name__ == "LCMScheduler" and ref.scheduler.config.original_inference_steps == 50
    assert ref.scheduler.config.prediction_type == json.loads(
        (lcm_folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
    ours = StableDiffusion.from_pretrained(lcm_folder, device="cpu")
    ours.progress = False
    assert ours.unet.config.time_cond_proj_dim == 16
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    theirs, mine = [], []

    def record(pipe, i, t, kw):
        theirs.append(kw["latents"].clone())
        return kw

    common = dict(num_inference_steps=4, guidance_scale=7.5, latents=latents, output_type="pt")
    ref_images = ref(PROMPTS, generator=torch.Generator().manual_seed(7), callback_on_step_end=record, **common).images
    images = ours(PROMPTS, generator=torch.Generator().manual_seed(7),  # sampler: "lcm", the LCM U-Net's default
                  callback=lambda i, t, z: mine.append(z.clone()), **common)
    assert len(mine) == len(theirs) == 4
    for i, (a, b) in enumerate(zip(mine, theirs)):
        report(f"LCM pipeline latents, step {i + 1}/4", a, b, 1e-3)
    report("LCM pipeline images", images, ref_images, 1e-3)
    other = ours(PROMPTS, generator=torch.Generator().manual_seed(7), **{**common, "guidance_scale": 2.0})
    assert (other - images).abs().max() > 1e-3  # the scale reaches the U-Net
    with pytest.raises(ValueError, match="negative_prompt"):
        ours(PROMPTS, negative_prompt="green", num_inference_steps=2)
    with pytest.raises(ValueError, match="guidance_rescale"):
        ours(PROMPTS, guidance_rescale=0.7, num_inference_steps=2)


def test_student_starts_as_the_teacher(tiny_pipe):
    """cond_proj zero: the student's ε is the teacher's, whatever scale it is given."""
    student = student_unet(tiny_pipe.unet, 16)
    assert student.config.time_cond_proj_dim == 16 and not student.time_embedding.cond_proj.weight.any()
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([999, 399, 19])
    context = tiny_pipe.encode_text(PROMPTS[:1] * 3)
    w_emb = guidance_scale_embedding(torch.tensor([2.0, 5.0, 8.0]), 16)
    with torch.no_grad():
        teacher_eps = tiny_pipe.unet(z, t, context)
        report("zero-initialised student vs teacher", student(z, t, context, timestep_cond=w_emb), teacher_eps, 1e-6)
        student.time_embedding.cond_proj.weight.normal_(generator=g)
        assert (student(z, t, context, timestep_cond=w_emb) - teacher_eps).abs().max() > 1e-3


def test_a_v_teachers_step_is_its_epsilon_step():
    """The guided v teacher's DDIM step (to_x0 and to_eps of its v) lands where an ε teacher predicting the same
    guided output's ε lands, on a zero-SNR schedule; and at t = 999, where ᾱ = 0 and an ε teacher could say
    nothing of the picture, it lands at √ᾱ_n·(−v) + √(1−ᾱ_n)·z (ẑ₀ = −v, ε̂ = z)."""
    alpha_bar = ZERO_SNR_V.alphas_cumprod()
    assert alpha_bar[999] == 0
    solver, g = DDIMSolver(alpha_bar), torch.Generator().manual_seed(0)
    z, cond, uncond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 8, generator=g), torch.zeros(3, 5, 8)
    n = torch.tensor([48, 25, 0])
    t, t_end, s = solver.start[n], solver.end[n], torch.tensor([3.0, 7.5, 9.0])
    weight = torch.randn(4, 4, generator=g)

    def v_teacher(x, tt, context):  # any function of its inputs, read as v
        return torch.einsum("oc,bchw->bohw", weight, x) * (1 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1))

    def eps_teacher(x, tt, context):  # the same outputs, rewritten as ε
        a = solver.alpha_bar[tt].view(-1, 1, 1, 1)
        return to_eps(v_teacher(x, tt, context), x, a, "v_prediction")

    ours = teacher_step(v_teacher, solver, z, t, t_end, cond, uncond, s, "v_prediction")
    report("v teacher step vs the ε step", ours, teacher_step(eps_teacher, solver, z, t, t_end, cond, uncond, s), 1e-5)
    assert not torch.allclose(ours, teacher_step(v_teacher, solver, z, t, t_end, cond, uncond, s))  # read as ε: not

    t, t_end = torch.full((3,), 999), torch.full((3,), solver.end[49].item())
    v = v_teacher(z, t, uncond) + s.view(-1, 1, 1, 1) * (v_teacher(z, t, cond) - v_teacher(z, t, uncond))
    a = alpha_bar[t_end[0]]
    report("v teacher step from pure noise", teacher_step(v_teacher, solver, z, t, t_end, cond, uncond, s, "v_prediction"),
           -a.sqrt() * v + (1 - a).sqrt() * z, 1e-5)


def test_train_lcm_runs_saves_loads_and_resumes(tiny_folder, tmp_path):
    out, work = tmp_path / "lcm", tmp_path / "work"
    common = ["lcm", "--base", str(tiny_folder), "--out", str(out), "--work", str(work), "--n-images", "8",
              "--batch", "2", "--time-cond-proj-dim", "16", "--bf16", "no"]
    assert train_main([*common, "--steps", "3"]) == out
    ck = torch.load(work / "lcm.pt", weights_only=True)
    assert ck["step"] == 3 and len(ck["losses"]) == 3 and torch.isfinite(ck["losses"]).all()
    assert ck["model"]["time_embedding.cond_proj.weight"].abs().max() > 0  # trained from zero
    assert not torch.equal(ck["model"]["conv_in.weight"], ck["ema"]["conv_in.weight"])  # the target trails
    index = json.loads((out / "model_index.json").read_text())
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline" and index["scheduler"][1] == "LCMScheduler"
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["original_inference_steps"] == 50
    base_scheduler = json.loads((tiny_folder / "scheduler" / "scheduler_config.json").read_text())
    assert all(scheduler[k] == base_scheduler[k] for k in ("beta_start", "beta_end", "beta_schedule"))
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["steps"] == 3 and record["minutes"]["steps_this_run"] == 3
    assert model_sampler(str(out)) == "lcm"  # the CLI's default for it, read before loading
    pipe = StableDiffusion.from_pretrained(out, device="cpu")
    pipe.progress = False
    assert pipe.unet.config.time_cond_proj_dim == 16
    image = pipe("a red circle", num_inference_steps=2, sampler="lcm", seed=0, output_type="pt")
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()

    with pytest.raises(ValueError, match=rf"^--out {out} already holds files"):
        train_main([*common, "--steps", "4"])
    train_main([*common, "--steps", "4", "--force"])
    assert "lcm: resumed at step 3" in (work / "log.txt").read_text()
    assert len(torch.load(work / "lcm.pt", weights_only=True)["losses"]) == 4

    # --init: a new run whose student (and target) start as a saved LCM's, not as the teacher
    more = tmp_path / "more"
    train_main(["lcm", "--base", str(tiny_folder), "--out", str(more), "--work", str(tmp_path / "work2"),
                "--n-images", "8", "--batch", "2", "--time-cond-proj-dim", "16", "--bf16", "no", "--steps", "1",
                "--lr", "1e-12", "--init", str(out)])
    before = StableDiffusion.from_pretrained(out, device="cpu").unet.state_dict()
    after = StableDiffusion.from_pretrained(more, device="cpu").unet.state_dict()
    assert before["time_embedding.cond_proj.weight"].abs().max() > 0  # trained, so not the teacher's zero
    assert all(torch.equal(before[k], after[k]) for k in before)  # a step at lr 1e-12 leaves the fp16 weights
    log = (tmp_path / "work2" / "log.txt").read_text()
    assert "continued from" in log and "zero)" not in log  # the log does not claim a fresh cond_proj


def test_train_lcm_from_a_v_teacher_keeps_its_schedule(tiny_folder, tmp_path):
    """--base a v-prediction, zero-terminal-SNR model: the student predicts v, and its LCMScheduler says so and
    rescales the betas as the teacher's did (diffusers' LCMScheduler reads both); a flow model is refused."""
    base = tmp_path / "v_base"
    shutil.copytree(tiny_folder, base)
    config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    config.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    out, work = tmp_path / "lcm", tmp_path / "work"
    train_main(["lcm", "--base", str(base), "--out", str(out), "--work", str(work), "--n-images", "4", "--batch", "2",
                "--time-cond-proj-dim", "16", "--bf16", "no", "--steps", "1"])
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["prediction_type"] == "v_prediction"
    assert scheduler["rescale_betas_zero_snr"] is True
    assert "predicting v_prediction, ᾱ at t = 999: 0" in (work / "log.txt").read_text()
    ref = diffusers.LCMScheduler.from_pretrained(out / "scheduler")
    assert ref.config.prediction_type == "v_prediction" and ref.alphas_cumprod[-1] < 1e-6

    config.update(prediction_type="flow")
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the teacher must be an ε- or v-prediction model"):
        train_main(["lcm", "--base", str(base), "--out", str(tmp_path / "flow"), "--work", str(tmp_path / "w2"),
                    "--n-images", "4", "--batch", "2", "--steps", "1"])


REFUSED = [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--batch", "-1"], "--batch must be at least 1, got -1"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--ema-decay", "1.5"], "--ema-decay must be a share between 0 and 1, got 1.5"),
    (["--huber-c", "0"], "--huber-c must be a number above 0, got 0.0"),
    (["--guidance-min", "0.5"], "--guidance-min must be at least 1 (no guidance) and at most --guidance-max"),
    (["--guidance-min", "10"], "--guidance-min must be at least 1 (no guidance) and at most --guidance-max"),
    (["--time-cond-proj-dim", "2"], "--time-cond-proj-dim must be at least 4, got 2"),
    (["--bf16", "maybe"], "--bf16 must be one of 'yes', 'no', 'auto', got 'maybe'"),
    (["--device", "gpu0"], "--device must be a torch device such as 'cpu' or 'cuda', got 'gpu0'"),
    (["--init", "no/such/folder"], "--init 'no/such/folder' is not a folder"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_careless_flags_are_refused_before_any_work(argv, message, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(ValueError) as info:
        train_main(["lcm", *argv, "--work", str(work), "--out", str(tmp_path / "out")])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not work.exists()


def test_default_output_is_outside_the_shipped_models():
    assert LCMConfig().out == "runs/tiny_lcm/model" and LCMConfig().base == "tiny"
