"""Inpainting keeps what is not masked, by default: the fill, the feathered paste-back, and diffusers' way kept."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minisd import StableDiffusion
from minisd.generate import DIFFUSERS_INPAINT, feather, fill_masked
from minisd.shapes import inpaint_eval as ie

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    pipe = StableDiffusion.from_pretrained("tiny", device="cpu")
    pipe.progress = False
    return pipe


def test_fill_takes_the_surrounding_colour_and_keeps_the_rest():
    x = torch.full((1, 3, 64, 64), 0.0)            # gray, in [-1, 1]
    x[..., 20:40, 36:56] = torch.tensor([0.7, -0.7, -0.7]).view(1, 3, 1, 1)  # a red square, to be repainted
    x[..., :, :8] = -0.9                            # a dark band on the far left
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:44, 32:60] = 1
    out = fill_masked(x, mask)
    assert torch.equal(out * (1 - mask), x * (1 - mask))
    inside = out[..., 16:44, 32:60]                 # gray around the square: gray inside, the far band barely felt
    assert inside.abs().mean() < 0.03 and inside.abs().max() < 0.1
    assert torch.equal(fill_masked(x, torch.ones(1, 1, 64, 64)), torch.zeros_like(x))  # nothing known: gray


def test_feather_is_a_blur_that_leaves_far_pixels_alone():
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    assert torch.equal(feather(mask, 0), mask)
    soft = feather(mask, 2.0)
    assert soft.min() >= 0 and soft.max() <= 1 + 1e-6
    assert soft[..., 16, 16].min() > 0.999 and soft[..., 16, 0].max() < 1e-3   # 8 px from the edge: untouched
    assert 0.4 < soft[0, 0, 16, 8] < 0.7                                       # the edge: half and half


@pytest.mark.parametrize("bad, message", [(dict(masked_content="noise"), "masked_content must be one of"),
                                          (dict(mask_blur=-1.0), "mask_blur must be")])
def test_bad_inpainting_options(tiny, bad, message):
    image, mask = Image.new("RGB", (64, 64), (128, 128, 128)), Image.new("L", (64, 64), 255)
    with pytest.raises(ValueError, match=message):
        tiny.inpaint("a red circle", image, mask, num_inference_steps=2, **bad)


def test_default_keeps_the_unmasked_part_and_diffusers_way_stays_available(tiny):
    """On gray with the background unnamed: the default leaves the pixels away from the mask as they
    were and repaints on gray; diffusers' settings (pure noise, no paste-back) are what generate does."""
    task = ie.background_inpaint_tasks(6)[5]
    assert (task.background, task.named) == ("gray", False)
    kw = dict(num_inference_steps=10, seed=3, output_type="pt")
    out = tiny.inpaint(task.prompt, task.image, task.mask, **kw)[0]
    outside, _ = ie.regions(task.mask)
    x = torch.from_numpy(np.asarray(task.image, dtype=np.float32) / 255).permute(2, 0, 1)
    assert (out - x).abs().amax(0)[torch.from_numpy(outside)].max() < 1 / 255
    assert ie.judge_keeping(task, Image.fromarray((out.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))[
        "background kept"]
    theirs = tiny.inpaint(task.prompt, task.image, task.mask, **DIFFUSERS_INPAINT, **kw)[0]
    from minisd.generate import generate
    assert torch.equal(theirs, generate(tiny, task.prompt, image=task.image, mask_image=task.mask, **kw)[0])


def test_stored_measurement_covers_every_background_and_the_default_keeps():
    """docs/results/inpaint_keeps.json (benchmarks/inpaint_keeps.py): ≥ 60 held-out cases on white, black
    and gray, named and unnamed; with the defaults nothing changes away from the mask, for both models."""
    res = json.loads((ROOT / "docs/results/inpaint_keeps.json").read_text())
    for model in ("blending (tiny)", "9-channel (tiny_inpaint)"):
        before, after = res[model]["diffusers"], res[model]["default"]
        assert after["all"]["n"] >= 60 and len(after) == 7    # all, and the six (background, named) groups
        assert after["all"]["max outside change"] < 1.0 <= before["all"]["max outside change"]
        assert after["all"]["background kept"] >= before["all"]["background kept"]
