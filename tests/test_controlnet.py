"""ControlNet: zero-init is a no-op, diffusers' ControlNetModel and pipeline are matched (plain, start/end,
guess mode, two ControlNets), original lllyasviel files load, bad input is refused; Canny equals OpenCV's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import report
from PIL import Image

from minisd import StableDiffusion, WeightsError, canny
from minisd.adapters.controlnet import ControlNet, load_controlnet, original_prefix_table, save_controlnet
from minisd.formats.weights import _rename

diffusers = pytest.importorskip("diffusers")

HINT = (8, 16, 16, 32)  # the hint encoder's widths: three stride-2 steps, 64 px -> the 8×8 latents (f = 8)
PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    p = StableDiffusion.from_pretrained(tiny_folder, device="cpu")
    p.progress = False
    return p


def random_controlnet(pipe, seed=0) -> ControlNet:
    """A ControlNet copied from the U-Net, then perturbed so that every weight (zero convs too) matters."""
    cn = ControlNet.from_unet(pipe.unet, HINT)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return cn


@pytest.fixture(scope="module")
def cn_folder(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet")
    save_controlnet(random_controlnet(pipe), folder)
    return folder


def control_picture(seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))


def test_fresh_controlnet_changes_nothing(pipe):
    cn = ControlNet.from_unet(pipe.unet, HINT)
    unet_sd = pipe.unet.state_dict()
    assert all(torch.equal(v, unet_sd[k]) for k, v in cn.state_dict().items() if k in unet_sd)  # a true copy
    assert sum(k in unet_sd for k in cn.state_dict()) == sum(k.startswith(("conv_in", "time_embedding", "down_blocks",
                                                                            "mid_block")) for k in unet_sd)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = pipe(PROMPT, num_inference_steps=5, latents=latents, output_type="latent")
    pipe.load_controlnet(cn)
    try:
        controlled = pipe(PROMPT, num_inference_steps=5, latents=latents, output_type="latent",
                          control_image=control_picture())
    finally:
        pipe.unload_controlnet()
    assert torch.equal(plain, controlled)  # zero convolutions: exactly no change


def test_from_unet_fills_every_parameter(pipe):
    """Every ControlNet parameter is the U-Net's tensor of the same name, or the ControlNet's own addition
    (the hint encoder, and the zero convs, which are zero); the weights equal the old copy-what-fits load."""
    from minisd.adapters.controlnet import ADDED, COPIED_FROM_UNET, ZERO_INITIALISED

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        cn = ControlNet.from_unet(pipe.unet, HINT)
        torch.manual_seed(3)  # the old way: build, then load whatever key and shape the U-Net shares
        old = ControlNet(cn.config)
        unet_sd = pipe.unet.state_dict()
        fits = {k: v for k, v in unet_sd.items() if k in old.state_dict() and old.state_dict()[k].shape == v.shape}
        old.load_state_dict({**old.state_dict(), **fits})
    sd = cn.state_dict()
    copied = [k for k in sd if k.startswith(COPIED_FROM_UNET)]
    added = [k for k in sd if k.startswith(ADDED)]
    assert len(copied) + len(added) == len(sd) and set(copied) == set(fits)
    assert all(torch.equal(sd[k], unet_sd[k]) for k in copied)
    zeros = [k for k in added if k.startswith(ZERO_INITIALISED)]
    assert len(zeros) == 2 * (len(cn.controlnet_down_blocks) + 1) + 2 and all(not sd[k].any() for k in zeros)
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in sd.items())


def test_residuals_match_diffusers(pipe, cn_folder):
    ours = load_controlnet(cn_folder, pipe.unet)
    ref = diffusers.ControlNetModel.from_pretrained(cn_folder)
    g = torch.Generator().manual_seed(1)
    z, ctx, img = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    t = torch.tensor([20, 800])
    with torch.no_grad():
        down, mid = ours(z, t, ctx, img, 0.7)
        ref_down, ref_mid = ref(z, t, ctx, img, conditioning_scale=0.7, return_dict=False)
    assert len(down) == len(ref_down) == 12
    report("ControlNet down residuals (12)", torch.cat([d.flatten() for d in down]),
           torch.cat([d.flatten() for d in ref_down]), 1e-4)
    report("ControlNet mid residual", mid, ref_mid, 1e-4)


@pytest.fixture(scope="module")
def ref_pipes(tiny_folder, cn_folder, pipe, tmp_path_factory):
    second = tmp_path_factory.mktemp("controlnet2")
    save_controlnet(random_controlnet(pipe, seed=1), second)
    cns = [diffusers.ControlNetModel.from_pretrained(f) for f in (cn_folder, second)]
    out = {}
    for key, cn in (("one", cns[0]), ("two", diffusers.MultiControlNetModel(cns))):
        ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
            tiny_folder, controlnet=cn, safety_checker=None, requires_safety_checker=False)
        ref.scheduler = diffusers.DDIMScheduler.from_pretrained(tiny_folder, subfolder="scheduler")
        ref.set_progress_bar_config(disable=True)
        out[key] = ref
    out["second"] = second
    return out


CASES = {"plain": {}, "start-end": {"control_start": 0.2, "control_end": 0.7}, "guess-mode": {"guess_mode": True}}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_diffusers(case, pipe, cn_folder, ref_pipes):
    kw = CASES[case]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    common = dict(num_inference_steps=10, latents=latents, output_type="pt", guidance_scale=7.5)
    ref = ref_pipes["one"](PROMPT, image=control_picture(), controlnet_conditioning_scale=0.8,
                           control_guidance_start=kw.get("control_start", 0.0),
                           control_guidance_end=kw.get("control_end", 1.0), guess_mode=kw.get("guess_mode", False),
                           **common).images
    pipe.load_controlnet(cn_folder)
    try:
        ours = pipe(PROMPT, control_image=control_picture(), controlnet_scale=0.8, **kw, **common)
        without = pipe(PROMPT, control_image=control_picture(), controlnet_scale=0.0, **common)
    finally:
        pipe.unload_controlnet()
    assert (ours - without).abs().max() > 1e-3  # the ControlNet does change the picture
    report(f"ControlNet pipeline, {case}", ours, ref, 1e-3)


def test_two_controlnets_match_diffusers(pipe, cn_folder, ref_pipes):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    images = [control_picture(1), control_picture(2)]
    ref = ref_pipes["two"](PROMPT, image=images, controlnet_conditioning_scale=[0.5, 1.2], num_inference_steps=8,
                           latents=latents, output_type="pt").images
    pipe.load_controlnet(cn_folder)
    pipe.load_controlnet(ref_pipes["second"])
    try:
        ours = pipe(PROMPT, control_image=images, controlnet_scale=[0.5, 1.2], num_inference_steps=8,
                    latents=latents, output_type="pt")
        with pytest.raises(ValueError, match="2 ControlNets are loaded"):
            pipe(PROMPT, control_image=images[0], num_inference_steps=2)
    finally:
        pipe.unload_controlnet()
    report("two ControlNets (scales 0.5, 1.2)", ours, ref, 1e-3)


def original_layout(cn: ControlNet) -> dict:
    """diffusers names -> lllyasviel's cldm names with the `control_model.` prefix, as in the .pth files."""
    sd = _rename(cn.state_dict(), original_prefix_table(cn.config), "test", reverse=True)
    return {f"control_model.{k}": v for k, v in sd.items()}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_original_lllyasviel_file(suffix, pipe, cn_folder, tmp_path):
    cn = load_controlnet(cn_folder, pipe.unet)
    sd = original_layout(cn)
    assert "control_model.input_hint_block.14.weight" in sd and "control_model.zero_convs.11.0.weight" in sd
    assert "control_model.middle_block_out.0.bias" in sd and "control_model.input_blocks.1.1.proj_in.weight" in sd
    path = tmp_path / f"control_sd15_test{suffix}"
    if suffix == ".pth":
        torch.save({k: v.clone() for k, v in sd.items()}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    loaded = load_controlnet(path, pipe.unet)
    assert loaded.config.conditioning_embedding_out_channels == HINT
    for k, v in cn.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ref = diffusers.ControlNetModel.from_single_file(path, config=str(cn_folder))  # diffusers' own conversion
    ref_sd = ref.state_dict()
    worst = max((ref_sd[k] - v).abs().max().item() for k, v in cn.state_dict().items())
    print(f"[parity] original-format ControlNet, minisd vs diffusers' conversion: max abs diff {worst:.1e}")
    assert worst == 0.0


def test_bad_control_input(pipe, cn_folder, tmp_path):
    with pytest.raises(ValueError, match="need a ControlNet"):
        pipe(PROMPT, control_image=control_picture(), num_inference_steps=2)
    with pytest.raises(TypeError, match="controlnet_sacle"):
        pipe(PROMPT, controlnet_sacle=1.0, num_inference_steps=2)
    pipe.load_controlnet(cn_folder)
    try:
        with pytest.raises(ValueError, match="needs control_image"):
            pipe(PROMPT, num_inference_steps=2, controlnet_scale=1.0)
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            pipe(PROMPT, control_image=torch.full((1, 3, 64, 64), -1.0), num_inference_steps=2)
        with pytest.raises(ValueError, match="control_start < control_end"):
            pipe(PROMPT, control_image=control_picture(), control_start=0.8, control_end=0.2, num_inference_steps=2)
        with pytest.raises(ValueError, match="3 control images for a batch of 1"):
            pipe(PROMPT, control_image=[control_picture()] * 3, num_inference_steps=2)
    finally:
        pipe.unload_controlnet()
    with pytest.raises(FileNotFoundError, match="no such file"):
        pipe.load_controlnet(tmp_path / "missing.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        pipe.load_controlnet(tmp_path / "empty")


def test_canny_equals_opencv():
    cv2 = pytest.importorskip("cv2")
    from skimage import data

    for name in ("astronaut", "coffee", "camera"):
        img = getattr(data, name)()
        ours = np.asarray(canny(Image.fromarray(img), 100, 200))
        ref = cv2.Canny(img, 100, 200)
        assert ours.shape == (*img.shape[:2], 3) and (ours[..., 0] == ours[..., 2]).all()
        mismatch = (ours[..., 0] != ref).mean()
        print(f"[parity] canny({name}) vs cv2.Canny: {mismatch:.2%} of pixels differ; edges {(ref > 0).mean():.1%}")
        assert mismatch == 0.0


def test_canny_finds_the_outline_of_a_square():
    x = np.zeros((32, 32), dtype=np.uint8)
    x[8:24, 8:24] = 255
    edges = np.asarray(canny(Image.fromarray(x).convert("RGB")))[..., 0] > 0
    assert edges[8:24, 7:9].any(axis=1).all() and edges[8:24, 23:25].any(axis=1).all()  # left and right sides
    assert not edges[12:20, 12:20].any() and not edges[:4].any()  # nothing inside, nothing far away
    with pytest.raises(ValueError, match="low threshold"):
        canny(Image.fromarray(x), 200, 100)
