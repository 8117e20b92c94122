"""The whole pipeline equals diffusers' StableDiffusion(Img2Img|Inpaint)Pipeline: same weights, prompts,
noise and sampler give the same latents and images (fp32 CPU, relative max difference <= 1e-3)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TEST, report
from PIL import Image

from minisd import StableDiffusion
from minisd.diffusion.samplers import SAMPLERS
from minisd.generate import DIFFUSERS_INPAINT

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle on the left", "a large blue square at the top"]


def diffusers_scheduler(name: str, folder, karras: bool = False):
    cls = getattr(diffusers, SAMPLERS[name].diffusers_class)
    kwargs = {"use_karras_sigmas": True} if karras else {}
    return cls.from_pretrained(folder, subfolder="scheduler", **kwargs)  # the json + that class's defaults


@pytest.fixture(scope="module")
def ref_pipe(tiny_folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_folder):
    pipe = StableDiffusion.from_pretrained(tiny_folder, device="cpu")
    pipe.progress = False
    return pipe


def noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# (diffusers' EulerAncestralDiscreteScheduler has no Karras option, so euler_a + karras has no reference)
CASES = [(name, False) for name in SAMPLERS] + [(n, True) for n in ("euler", "heun", "lms", "dpmpp_2m")]


@pytest.mark.parametrize("name,karras", CASES, ids=[f"{n}{'-karras' if k else ''}" for n, k in CASES])
def test_txt2img_matches_diffusers(name, karras, ours, ref_pipe, tiny_folder):
    ref_pipe.scheduler = diffusers_scheduler(name, tiny_folder, karras)
    latents = noise((2, 4, 8, 8))
    common = dict(num_inference_steps=12, guidance_scale=7.5, latents=latents)
    ref = ref_pipe(PROMPTS, negative_prompt=["green", "black background"], output_type="latent",
                   generator=torch.Generator().manual_seed(7), **common).images
    mine = ours(PROMPTS, negative_prompt=["green", "black background"], output_type="latent", sampler=name,
                karras=karras, generator=torch.Generator().manual_seed(7), **common)
    report(f"txt2img {name}{' karras' if karras else ''} latents (CFG 7.5, negative prompt)", mine, ref, 1e-3)


@pytest.mark.parametrize("name", ["ddim", "pndm", "euler", "dpmpp_2m"])
def test_no_guidance_and_images(name, ours, ref_pipe, tiny_folder):
    """guidance_scale=1 (one branch), and the decoded images, not only the latents."""
    ref_pipe.scheduler = diffusers_scheduler(name, tiny_folder)
    latents = noise((1, 4, 8, 8), seed=1)
    ref = ref_pipe(PROMPTS[0], num_inference_steps=10, guidance_scale=1.0, latents=latents, output_type="pt").images
    mine = ours(PROMPTS[0], num_inference_steps=10, guidance_scale=1.0, latents=latents, sampler=name,
                output_type="pt")
    report(f"txt2img {name} images, guidance 1", mine, ref, 1e-3)


def test_ddim_eta_matches_diffusers(ours, ref_pipe, tiny_folder):
    ref_pipe.scheduler = diffusers_scheduler("ddim", tiny_folder)
    latents = noise((1, 4, 8, 8), seed=2)
    ref = ref_pipe(PROMPTS[1], num_inference_steps=10, eta=0.7, latents=latents, output_type="latent",
                   generator=torch.Generator().manual_seed(3)).images
    mine = ours(PROMPTS[1], num_inference_steps=10, eta=0.7, latents=latents, output_type="latent", sampler="ddim",
                generator=torch.Generator().manual_seed(3))
    report("txt2img ddim eta=0.7", mine, ref, 1e-3)


def test_seed_and_num_images_per_prompt(ours, ref_pipe, tiny_folder):
    """No latents given: the noise is drawn from the generator, as diffusers draws it."""
    ref_pipe.scheduler = diffusers_scheduler("ddim", tiny_folder)
    ref = ref_pipe(PROMPTS, num_inference_steps=6, num_images_per_prompt=2, output_type="latent",
                   generator=torch.Generator().manual_seed(11)).images
    mine = ours(PROMPTS, num_inference_steps=6, num_images_per_prompt=2, output_type="latent", seed=11)
    assert mine.shape == (4, 4, 8, 8)
    report("txt2img seed 11, 2 prompts x 2 images", mine, ref, 1e-3)


def picture(seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = np.full((64, 64, 3), 245, np.uint8)
    img[16:40, 10:34] = (220, 40, 40)
    img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def mask_picture() -> Image.Image:
    m = np.zeros((64, 64), np.uint8)
    m[8:48, 4:40] = 255
    return Image.fromarray(m)


# Not lms: diffusers' LMSDiscreteScheduler, started part-way (img2img), weights its first step with the
# 4th-order coefficients while it holds a single slope, which shrinks that step; minisd ramps the
# order up from 1 as at the start of txt2img (see docs/samplers.md).
@pytest.mark.parametrize("name", ["ddim", "pndm", "euler", "euler_a", "heun", "dpmpp_2m"])
def test_img2img_matches_diffusers(name, ours, ref_pipe, tiny_folder):
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**ref_pipe.components)
    pipe.scheduler = diffusers_scheduler(name, tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS[0], image=picture(), strength=0.6, num_inference_steps=10, output_type="pt",
               generator=torch.Generator().manual_seed(5)).images
    mine = ours.img2img(PROMPTS[0], picture(), strength=0.6, num_inference_steps=10, output_type="pt",
                        sampler=name, generator=torch.Generator().manual_seed(5))
    report(f"img2img {name} strength 0.6 images (posterior sample and noise from one generator)", mine, ref, 1e-3)


@pytest.mark.parametrize("per_prompt", [1, 2])
def test_img2img_with_one_picture_per_prompt_matches_diffusers(per_prompt, ours, ref_pipe, tiny_folder):
    """A list of pictures, one per prompt (and each repeated for num_images_per_prompt, in diffusers' order)."""
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**ref_pipe.components)
    pipe.scheduler = diffusers_scheduler("ddim", tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    common = dict(strength=0.6, num_inference_steps=10, output_type="pt", num_images_per_prompt=per_prompt)
    pictures = [picture(0), picture(1).transpose(Image.FLIP_LEFT_RIGHT)]
    ref = pipe(PROMPTS, image=pictures, generator=torch.Generator().manual_seed(5), **common).images
    mine = ours.img2img(PROMPTS, pictures, generator=torch.Generator().manual_seed(5), **common)
    assert mine.shape == (2 * per_prompt, 3, 64, 64)
    report(f"img2img, two pictures for two prompts × {per_prompt}", mine, ref, 1e-3)


def test_inpaint_with_one_picture_and_mask_per_prompt_matches_diffusers(ours, ref_pipe, tiny_folder):
    pipe = diffusers.StableDiffusionInpaintPipeline(**ref_pipe.components)
    pipe.scheduler = diffusers_scheduler("ddim", tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    pictures = [picture(0), picture(1).transpose(Image.FLIP_TOP_BOTTOM)]
    masks = [mask_picture(), mask_picture().transpose(Image.FLIP_LEFT_RIGHT)]
    common = dict(strength=0.7, num_inference_steps=8, output_type="pt")
    ref = pipe(PROMPTS, image=pictures, mask_image=masks, generator=torch.Generator().manual_seed(9), **common).images
    mine = ours.inpaint(PROMPTS, pictures, masks, generator=torch.Generator().manual_seed(9), keep_unmasked=False,
                        masked_content="original", **common)
    report("inpaint (4-channel U-Net, blending), two pictures and masks for two prompts", mine, ref, 1e-3)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_standard_unet_matches_diffusers(name, strength, ours, ref_pipe, tiny_folder):
    pipe = diffusers.StableDiffusionInpaintPipeline(**ref_pipe.components)
    pipe.scheduler = diffusers_scheduler(name, tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS[1], image=picture(), mask_image=mask_picture(), strength=strength, num_inference_steps=8,
               output_type="pt", generator=torch.Generator().manual_seed(9)).images
    mine = ours.inpaint(PROMPTS[1], picture(), mask_picture(), strength=strength, num_inference_steps=8,
                        output_type="pt", sampler=name, generator=torch.Generator().manual_seed(9),
                        keep_unmasked=False, masked_content="original")  # diffusers' way, not the default
    report(f"inpaint (4-channel U-Net, blending) {name} strength {strength}", mine, ref, 1e-3)


@pytest.fixture(scope="module")
def inpaint_folder(tokenizer, tmp_path_factory):
    pipe = StableDiffusion.from_config(replace(TEST, unet=replace(TEST.unet, in_channels=9)), tokenizer, seed=1)
    folder = tmp_path_factory.mktemp("inpaint9")
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_inpaint_nine_channel_unet_matches_diffusers(name, inpaint_folder):
    ours = StableDiffusion.from_pretrained(inpaint_folder, device="cpu")
    ours.progress = False
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(inpaint_folder, safety_checker=None,
                                                                    requires_safety_checker=False)
    pipe.scheduler = diffusers_scheduler(name, inpaint_folder)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS[0], image=picture(), mask_image=mask_picture(), num_inference_steps=8, output_type="pt",
               generator=torch.Generator().manual_seed(4)).images
    mine = ours.inpaint(PROMPTS[0], picture(), mask_picture(), num_inference_steps=8, output_type="pt", sampler=name,
                        generator=torch.Generator().manual_seed(4), **DIFFUSERS_INPAINT)
    report(f"inpaint (9-channel U-Net) {name}", mine, ref, 1e-3)


def test_clip_skip_matches_diffusers(ours, ref_pipe, tiny_folder):
    """diffusers' own clip_skip path reaches for `text_encoder.text_model`, which transformers >= 5.6 no
    longer has, so the reference embeddings are made by hand: hidden_states[-2], then the final LayerNorm."""
    ref_pipe.scheduler = diffusers_scheduler("ddim", tiny_folder)
    te = ref_pipe.text_encoder
    final_norm = getattr(te, "final_layer_norm", None) or te.text_model.final_layer_norm
    with torch.no_grad():
        embeds = [final_norm(te(ours.tokenizer([p]), output_hidden_states=True).hidden_states[-2]) for p in (PROMPTS[0], "")]
    latents = noise((1, 4, 8, 8), seed=4)
    ref = ref_pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_inference_steps=5, latents=latents,
                   output_type="latent").images
    mine = ours(PROMPTS[0], num_inference_steps=5, latents=latents, clip_skip=1, output_type="latent")
    report("txt2img clip_skip=1", mine, ref, 1e-3)


@pytest.fixture(scope="module")
def vpred_folder(tokenizer, tmp_path_factory):
    """SD 2.x-style: v-prediction, linear proj_in/proj_out, per-level heads, GELU text encoder."""
    cfg = replace(TEST, unet=replace(TEST.unet, use_linear_projection=True, num_heads=(1, 2, 2, 4)),
                  text_encoder=replace(TEST.text_encoder, hidden_act="gelu"),
                  scheduler=replace(TEST.scheduler, prediction_type="v_prediction"))
    pipe = StableDiffusion.from_config(cfg, tokenizer, seed=2)
    folder = tmp_path_factory.mktemp("vpred")
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_v_prediction_sd2_style_matches_diffusers(name, vpred_folder):
    ours = StableDiffusion.from_pretrained(vpred_folder, device="cpu")
    ours.progress = False
    assert ours.scheduler.prediction_type == "v_prediction" and ours.unet.config.use_linear_projection
    ref = diffusers.StableDiffusionPipeline.from_pretrained(vpred_folder, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.scheduler = diffusers_scheduler(name, vpred_folder)
    ref.set_progress_bar_config(disable=True)
    latents = noise((1, 4, 8, 8), seed=8)
    a = ref(PROMPTS[0], num_inference_steps=8, latents=latents, output_type="latent").images
    b = ours(PROMPTS[0], num_inference_steps=8, latents=latents, output_type="latent", sampler=name)
    report(f"txt2img v-prediction (SD 2.x style) {name}", b, a, 1e-3)
