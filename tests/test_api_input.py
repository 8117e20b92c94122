"""Careless arguments to the generation API fail before any network runs, with one line naming the value."""

import math

import pytest

from minisd import StableDiffusion


@pytest.fixture(scope="module")
def pipe():
    p = StableDiffusion.from_pretrained("tiny", device="cpu")
    p.progress = False
    return p


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(num_inference_steps=1001), "num_inference_steps 1001 is more than the model's 1000 training timesteps"),
    (dict(num_inference_steps=1001, sampler="pndm"), "pndm can take at most 1000"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer, got 0"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be a positive integer, got 2.5"),
    (dict(seed=2**64), "seed must be an integer in [0, 2**63), got 18446744073709551616"),
    (dict(seed=-3), "seed must be an integer in [0, 2**63), got -3"),
    (dict(seed=1.5), "seed must be an integer in [0, 2**63), got 1.5"),
    (dict(height=0), "height and width must be positive multiples of 8, got 0x64"),
    (dict(width=60), "height and width must be positive multiples of 8, got 64x60"),
    (dict(guidance_scale=math.nan), "guidance_scale must be a finite number >= 0, got nan"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(eta=math.inf), "eta must be a finite number >= 0, got inf"),
    (dict(sampler="dpm_fast"), "unknown sampler 'dpm_fast'"),
    (dict(output_type="np"), "output_type must be 'pil', 'pt' or 'latent', got 'np'"),
])
def test_bad_arguments_are_refused_before_any_work(pipe, kwargs, fragment):
    with pytest.raises(ValueError) as e:
        pipe("a red circle", **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_img2img_without_an_image_is_refused(pipe):
    with pytest.raises((ValueError, TypeError), match="image"):
        pipe.img2img("a red circle", None)
