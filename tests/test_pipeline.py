"""How the pipeline behaves where no reference decides: determinism, guidance, inputs, outputs, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from minisd.generate import decode_latents
from minisd.images import image_to_tensor


@pytest.fixture
def pipe(tiny_pipe):
    tiny_pipe.progress = False
    return tiny_pipe


def test_same_seed_same_image_other_seed_other_image(pipe):
    a = pipe("a red circle", num_inference_steps=4, seed=5, output_type="pt")
    b = pipe("a red circle", num_inference_steps=4, seed=5, output_type="pt")
    c = pipe("a red circle", num_inference_steps=4, seed=6, output_type="pt")
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-3


@pytest.mark.parametrize("sampler", ["ddpm", "euler_a"])
def test_stochastic_samplers_are_deterministic_per_seed(pipe, sampler):
    a = pipe("a blue square", num_inference_steps=4, seed=1, sampler=sampler, output_type="latent")
    b = pipe("a blue square", num_inference_steps=4, seed=1, sampler=sampler, output_type="latent")
    c = pipe("a blue square", num_inference_steps=4, seed=2, sampler=sampler, output_type="latent")
    assert torch.equal(a, b) and not torch.equal(a, c)


def count_unet_calls(pipe):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls, handle


def test_guidance_one_runs_one_branch_and_cfg_batches_two(pipe):
    calls, handle = count_unet_calls(pipe)
    try:
        pipe("a red circle", num_inference_steps=3, guidance_scale=1.0, seed=0, output_type="latent")
        assert calls == [1, 1, 1]
        calls.clear()
        pipe(["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=7.5, seed=0, output_type="latent")
        assert calls == [4, 4, 4]  # [∅, ∅, c, c] in one batch per step
    finally:
        handle.remove()


def test_negative_prompt_changes_the_image(pipe):
    a = pipe("a red circle", num_inference_steps=3, seed=0, output_type="latent")
    b = pipe("a red circle", negative_prompt="black background", num_inference_steps=3, seed=0, output_type="latent")
    assert not torch.allclose(a, b)


def test_outputs_and_callback(pipe):
    steps = []
    pil = pipe(["a red circle", "a green square"], num_inference_steps=4, seed=0, num_images_per_prompt=2,
               callback=lambda i, t, z: steps.append((i, float(t), tuple(z.shape))))
    assert len(pil) == 4 and all(isinstance(im, Image.Image) and im.size == (64, 64) for im in pil)
    assert [s[0] for s in steps] == [0, 1, 2, 3] and steps[0][2] == (4, 4, 8, 8)
    pt = pipe("a red circle", num_inference_steps=2, seed=0, output_type="pt")
    assert pt.shape == (1, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    latent = pipe("a red circle", num_inference_steps=2, seed=0, output_type="latent", height=72, width=48)
    assert latent.shape == (1, 4, 9, 6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="plms2"), "known samplers: ddpm, ddim, pndm"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(height=60), "multiples of 8"),
    (dict(output_type="numpy"), "output_type"),
    (dict(karras=True, sampler="ddim"), "karras"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), "latents must have shape"),
    (dict(clip_skip=5), "clip_skip"),
])
def test_bad_generation_arguments(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe("a red circle", **{"num_inference_steps": 2, **kwargs})


def test_bad_img2img_and_inpaint_arguments(pipe, tmp_path):
    img = Image.new("RGB", (64, 64), (245, 245, 245))
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        pipe.img2img("a red circle", img, strength=1.5)
    with pytest.raises(ValueError, match="leaves no step"):
        pipe.img2img("a red circle", img, strength=0.01, num_inference_steps=10)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        pipe.img2img("a red circle", tmp_path / "missing.png")
    with pytest.raises(ValueError, match="mask_image is 32x32 but the image is 64x64"):
        pipe.inpaint("a red circle", img, Image.new("L", (32, 32)))
    with pytest.raises(ValueError, match="2 images cannot be shared out over 3 pictures"):
        pipe.img2img(["a red circle"] * 3, [img, img], num_inference_steps=2)
    with pytest.raises(ValueError, match="2 images and 3 masks"):
        pipe.inpaint(["a red circle"] * 2, [img, img], [Image.new("L", (64, 64))] * 3, num_inference_steps=2)
    with pytest.raises(ValueError, match="image is an empty list"):
        pipe.img2img("a red circle", [], num_inference_steps=2)


def test_a_list_of_pictures_gives_one_picture_per_prompt(pipe):
    """img2img with [a, b] for two prompts starts each prompt from its own picture: at strength 0.2 each
    result's latents stay nearest their own picture's. Masks the same way for inpainting."""
    dark, light = Image.new("RGB", (64, 64), (20, 20, 20)), Image.new("RGB", (64, 64), (235, 235, 235))
    with torch.no_grad():
        own = torch.cat([pipe.vae.encode(image_to_tensor(im)).mean for im in (dark, light)]) * pipe.vae.scaling_factor
    z = pipe.img2img(["a red circle"] * 2, [dark, light], strength=0.2, num_inference_steps=10, output_type="latent", seed=0)
    distance = torch.cdist(z.flatten(1), own.flatten(1))  # (result, picture)
    assert distance[0, 0] < distance[0, 1] and distance[1, 1] < distance[1, 0], distance
    left, right = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    left[:, :32], right[:, 32:] = 255, 255
    out = pipe.inpaint(["a red circle"] * 2, dark, [Image.fromarray(left), Image.fromarray(right)],
                       keep_unmasked=True, mask_blur=0, num_inference_steps=2, output_type="pt", seed=0)
    assert torch.allclose(out[0, :, :, 32:], torch.full_like(out[0, :, :, 32:], 20 / 255), atol=1e-6)
    assert torch.allclose(out[1, :, :, :32], torch.full_like(out[1, :, :, :32], 20 / 255), atol=1e-6)


def test_long_prompt_warns(pipe):
    with pytest.warns(UserWarning, match="truncated"):
        pipe("red " * 100, num_inference_steps=1, output_type="latent")


def test_fp16_vae_overflow_is_decoded_again_in_fp32(tiny_pipe):
    """A VAE whose fp16 activations overflow gives NaN/inf; decode_latents notices and redoes it in fp32."""
    import copy

    pipe = copy.deepcopy(tiny_pipe)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.mul_(3e4)  # outputs beyond fp16's 65504
    pipe.vae.half()
    z = torch.randn(1, 4, 8, 8)
    with pytest.warns(UserWarning, match="overflowed"):
        x = decode_latents(pipe, z)
    assert torch.isfinite(x).all() and pipe.vae.dtype == torch.float16


def test_bfloat16_on_request(tiny_pipe):
    import copy

    pipe = copy.deepcopy(tiny_pipe).to(dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    ref = tiny_pipe("a red circle", num_inference_steps=4, seed=0, output_type="pt")
    out = pipe("a red circle", num_inference_steps=4, seed=0, output_type="pt")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().mean() < 0.05  # bf16 rounding, not another picture


def test_vae_tiling_and_slicing_decode_large_pictures_without_seams():
    """A 128×128 picture (4× the tiny VAE's native area) decoded whole, in 64-px tiles and one by one."""
    import numpy as np

    from minisd import StableDiffusion, shapes

    pipe = StableDiffusion.from_pretrained("tiny", device="cpu")
    pipe.progress = False
    quads = [shapes.to_tensor(shapes.render(shapes.make_scene(i))) for i in range(4)]
    big = torch.cat([torch.cat(quads[:2], dim=2), torch.cat(quads[2:], dim=2)], dim=1)[None]  # (1, 3, 128, 128)
    with torch.no_grad():  # each quadrant encoded at the native size (the encoder too only ever saw 64 px)
        zs = pipe.vae.encode(torch.stack(quads)).mode()
        z = torch.cat([torch.cat([zs[0], zs[1]], dim=2), torch.cat([zs[2], zs[3]], dim=2)], dim=1)[None]
        whole = pipe.vae.decode(z)
        tiled = pipe.vae.tiled_decode(z, tile=16)
    assert tiled.shape == whole.shape == big.shape
    err_tiled, err_whole = (tiled - big).abs().mean().item(), (whole - big).abs().mean().item()
    print(f"[tiling] 128 px reconstruction, mean |error|: 16-latent tiles {err_tiled:.3f}, whole {err_whole:.3f}")
    # the tiny VAE only ever saw 64 px: its mid-block attention and GroupNorm over a 4× larger latent degrade
    # the whole decode, while each tile is the size it knows
    assert err_tiled < 0.1 and err_tiled <= err_whole and np.isfinite(tiled.numpy()).all()
    pipe.enable_vae_slicing()
    pipe.enable_vae_tiling()
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    images = pipe(["a red circle", "a blue square"], height=128, width=128, num_inference_steps=2, latents=latents,
                  output_type="pt")
    assert images.shape == (2, 3, 128, 128) and torch.isfinite(images).all()


# ─── the denoiser wrappers, each alone ─────────────────────────────────────────────────────────────

def recording_net(calls: list, out_fn=lambda z, t, context: z * 0 + context.mean((1, 2))[:, None, None, None]):
    """A stand-in network: records what it was given, answers out_fn(z, t, context) (default: each row's
    context mean)."""
    def net(z, t, context, control=None):
        calls.append({"z": z, "t": t, "context": context, "control": control})
        return out_fn(z, t, context)
    return net


def test_cfg_batches_uncond_then_cond_and_extrapolates():
    from minisd.diffusion import denoisers as dn

    calls = []
    cond, uncond = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), -1.0)
    z = torch.randn(2, 4, 8, 8)
    guided = dn.with_cfg(recording_net(calls), cond, uncond, 7.5)(z, torch.tensor(5.0))
    assert calls[0]["z"].shape[0] == 4 and torch.equal(calls[0]["context"], torch.cat([uncond, cond]))
    # the net answers the context's mean: ∅ -> -1, c -> 2, so ε̃ = −1 + 7.5·(2 − (−1)) = 21.5
    assert torch.allclose(guided, torch.full_like(z, 21.5))
    calls.clear()
    plain = dn.with_cfg(recording_net(calls), cond, None, 7.5)(z, torch.tensor(5.0))
    assert calls[0]["z"].shape[0] == 2 and torch.allclose(plain, torch.full_like(z, 2.0))  # one branch, scale unused


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_every_prediction_type_becomes_eps(prediction_type):
    from minisd.diffusion import denoisers as dn

    g = torch.Generator().manual_seed(0)
    z0, eps, abar = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), 0.3
    z_t = abar**0.5 * z0 + (1 - abar) ** 0.5 * eps
    target = {"epsilon": eps, "v_prediction": abar**0.5 * eps - (1 - abar) ** 0.5 * z0, "sample": z0}[prediction_type]
    model = dn.as_eps(lambda z, t: target, prediction_type)
    assert torch.allclose(model(z_t, torch.tensor(500.0), abar), eps, atol=1e-5)


def test_extra_channels_follow_the_batch_and_controlnet_residuals_reach_the_unet():
    from minisd.diffusion import denoisers as dn

    calls, seen = [], []
    extra = torch.randn(2, 5, 8, 8)
    residuals = ([torch.ones(1)], torch.ones(1))

    def control(z, t, context):
        seen.append(z.shape)
        return residuals

    net = dn.with_controlnet(dn.with_extra_channels(recording_net(calls), extra), control)
    dn.with_cfg(net, torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), 2.0)(torch.randn(2, 4, 8, 8), torch.tensor(1.0))
    x_in = calls[0]["z"]
    assert x_in.shape == (4, 9, 8, 8) and torch.equal(x_in[:2, 4:], extra) and torch.equal(x_in[2:, 4:], extra)
    assert seen == [(4, 4, 8, 8)]  # the ControlNet sees the latents alone
    assert calls[0]["control"] is residuals


def test_copy_output_keeps_the_answer_when_the_buffer_is_reused():
    from minisd.diffusion import denoisers as dn

    buffer = torch.zeros(1, 4, 2, 2)

    def graph(z, t, context, control=None):  # like a CUDA graph: the same output tensor every replay
        return buffer.copy_(z)

    copied = dn.copy_output(graph)
    a = copied(torch.ones(1, 4, 2, 2), None, None)
    copied(torch.full((1, 4, 2, 2), 2.0), None, None)
    assert torch.equal(a, torch.ones(1, 4, 2, 2))


def test_finite_check_names_the_component_and_the_step():
    from minisd.diffusion import denoisers as dn

    timesteps = torch.tensor([801.0, 601.0, 401.0, 201.0, 1.0])
    nan_at_401 = recording_net([], lambda z, t, c: z * float("nan") if float(t) == 401 else z)
    check = dn.FiniteCheck("error", timesteps)
    net = check.net(nan_at_401, "U-Net")
    z = torch.zeros(1, 4, 2, 2)
    net(z, timesteps[0], None)
    with pytest.raises(FloatingPointError, match=r"the U-Net produced NaN/inf at step 3 of 5 \(t=401\)"):
        for t in timesteps[1:]:
            net(z, t, None)
    warn = dn.FiniteCheck("warn", timesteps)
    residuals = warn.control(lambda z, t, c: ([z * float("inf")], z), "ControlNet")
    with pytest.warns(RuntimeWarning, match=r"the ControlNet produced NaN/inf at step 1 of 5 \(t=801\)"):
        residuals(z, timesteps[0], None)
    assert dn.FiniteCheck("off", timesteps).net(nan_at_401, "U-Net") is nan_at_401  # off: not even wrapped
    with pytest.raises(ValueError, match="nan_check must be one of"):
        dn.FiniteCheck("loud", timesteps)


def test_a_nan_in_the_unet_stops_generation(pipe):
    import warnings

    calls = []

    def poison(module, args, out):  # the third U-Net call returns NaN
        calls.append(1)
        return out * float("nan") if len(calls) == 3 else out

    handle = pipe.unet.register_forward_hook(poison)
    try:
        with pytest.raises(FloatingPointError, match=r"the U-Net produced NaN/inf at step 3 of 4 \(t=\d+\)"):
            pipe("a red circle", num_inference_steps=4, seed=0, output_type="latent")
        assert len(calls) == 3  # stopped there
        calls.clear()
        pipe.nan_check = "warn"
        with pytest.warns(RuntimeWarning, match="the U-Net produced NaN/inf at step 3 of 4"):
            out = pipe("a red circle", num_inference_steps=4, seed=0, output_type="latent")
        assert len(calls) == 4 and torch.isnan(out).all()
        calls.clear()
        pipe.nan_check = "off"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pipe("a red circle", num_inference_steps=4, seed=0, output_type="latent")
    finally:
        handle.remove()
        pipe.nan_check = "error"


def test_a_nan_in_the_decoded_image_is_named(pipe):
    with pytest.raises(FloatingPointError, match="the VAE decoder produced NaN/inf"):
        decode_latents(pipe, torch.full((1, 4, 8, 8), float("nan")))


def test_a_nan_in_the_text_encoder_is_named(pipe):
    handle = pipe.text_encoder.register_forward_hook(lambda m, args, out: out * float("nan"))
    try:
        with pytest.raises(FloatingPointError, match="the text encoder produced NaN/inf"):
            pipe("a red circle", num_inference_steps=2, seed=0, output_type="latent")
    finally:
        handle.remove()


def test_every_sampler_carries_its_label_and_functions():
    import inspect

    from minisd.diffusion.samplers import SAMPLERS

    labels = {"ddim": "DDIM", "ddpm": "DDPM", "pndm": "PLMS", "euler": "Euler", "euler_a": "Euler a",
              "heun": "Heun", "lms": "LMS", "dpmpp_2m": "DPM++ 2M"}
    assert {name: s.label for name, s in SAMPLERS.items() if name in labels} == labels
    for name, s in SAMPLERS.items():
        assert s.name == name and s.label and s.kind in ("discrete", "sigma") and s.diffusers_class.endswith("Scheduler")
        params = inspect.signature(s.fn).parameters
        assert "callback" in params and all(o in params for o in s.options), name
        assert callable(s.schedule)


@pytest.mark.parametrize("kwargs,match", [
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(eta=float("nan")), "eta"),
    (dict(eta=-0.5), "eta"),
])
def test_non_finite_numbers_are_refused(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe("a red circle", num_inference_steps=2, **kwargs)


def test_img2img_and_inpaint_refuse_missing_or_out_of_range_pictures(pipe):
    img = Image.new("RGB", (64, 64), (245, 245, 245))
    with pytest.raises(ValueError, match="img2img needs an image"):
        pipe.img2img("a red circle", None, num_inference_steps=2)
    with pytest.raises(ValueError, match="inpaint needs an image and a mask_image"):
        pipe.inpaint("a red circle", img, None, num_inference_steps=2)
    with pytest.raises(ValueError, match="strength"):
        pipe.img2img("a red circle", img, strength=float("nan"), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        pipe.img2img("a red circle", torch.full((1, 3, 64, 64), 255.0), num_inference_steps=2)
    with pytest.raises(ValueError, match="need a ControlNet"):
        pipe.img2img("a red circle", img, control_image=img, num_inference_steps=2)


def test_compile_mode_is_the_pipelines_own_state(pipe):
    import copy

    p = copy.deepcopy(pipe)
    assert p.compile_mode is None
    p.compile(mode="reduce-overhead", vae=False)  # lazy: nothing compiles until a call
    assert p.compile_mode == "reduce-overhead" and not hasattr(p.unet, "_minisd_cudagraphs")
