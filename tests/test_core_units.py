"""Unit tests of the pieces: schedules, attention, the sampler schedules, configs."""

from __future__ import annotations

import json

import pytest
import torch

from minisd import SD15, TINY, ModelConfig, UNetConfig, capture_attention
from minisd import attention
from minisd.nn.attention import attention_probs
from minisd.diffusion.samplers import make_schedule
from minisd.diffusion.schedules import SchedulerConfig, alphas_cumprod, cosine_betas, q_sample, q_step, snr


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_equal_diffusers(schedule):
    diffusers = pytest.importorskip("diffusers")
    cfg = SchedulerConfig(beta_schedule=schedule)
    ref = diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=cfg.beta_start, beta_end=cfg.beta_end)
    assert torch.allclose(cfg.betas(), ref.betas, atol=1e-7)
    assert torch.allclose(cfg.alphas_cumprod(), ref.alphas_cumprod, atol=1e-6)


def test_closed_form_equals_the_chain():
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε has the distribution of t steps of x_t = √(1−β_t) x_{t−1} + √β_t ε."""
    betas = cosine_betas(200)
    abar = alphas_cumprod(betas)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000,), 0.7)
    x = x0.clone()
    for t in range(120):
        x = q_step(x, t, torch.randn(x.shape, generator=g), betas)
    closed = q_sample(x0, torch.tensor(119), torch.randn(x0.shape, generator=g), abar)
    assert abs(x.mean() - closed.mean()) < 0.02 and abs(x.std() - closed.std()) < 0.02
    assert abs(closed.mean() - 0.7 * abar[119].sqrt()) < 0.02


def test_snr_falls_with_t():
    s = snr(SchedulerConfig().alphas_cumprod())
    assert (s[1:] < s[:-1]).all() and s[0] > 1e2 and s[-1] < 1e-2


def test_sd15_timesteps():
    """SD 1.5 with 50 steps: DDIM's 981, 961, ..., 1 and PLMS's repeated second step (FORMATS.md §1.7)."""
    ddim = make_schedule("ddim", 50, SD15.scheduler).timesteps
    assert ddim[:3].tolist() == [981, 961, 941] and ddim[-1] == 1 and len(ddim) == 50
    plms = make_schedule("pndm", 50, SD15.scheduler).timesteps
    assert plms[:4].tolist() == [981, 961, 961, 941] and len(plms) == 51


def test_attention_paths_agree_and_rows_sum_to_one():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g) for _ in range(3))
    for causal in (False, True):
        assert torch.allclose(attention(q, k, v, naive=True, causal=causal), attention(q, k, v, causal=causal), atol=1e-5)
    p = attention_probs(q, k, causal=True)
    assert torch.allclose(p.sum(-1), torch.ones(2, 4, 16)) and (p.triu(1) == 0).all()


def test_attention_upcast_holds_under_autocast():
    """`upcast` (SD 2.1; and bf16 on a CPU, where fp32's kernel is the faster one) really computes in fp32:
    autocast would otherwise cast the inputs straight back to bf16. The output keeps the inputs' dtype."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=g) for _ in range(3))
    exact = attention(q, k, v)
    bf = [x.bfloat16() for x in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(*bf)
        probs = attention_probs(*bf[:2], upcast=True)
    assert out.dtype == torch.bfloat16 and probs.dtype == torch.float32
    from_rounded_inputs = attention(*(x.float() for x in bf))  # fp32 math on the bf16-rounded inputs
    assert (out.float() - from_rounded_inputs).abs().max() <= 2 ** -7 * from_rounded_inputs.abs().max()
    assert (out.float() - exact).abs().max() < 0.05


def test_capture_attention(tiny_pipe):
    tiny_pipe.progress = False
    with capture_attention(tiny_pipe.unet) as maps:
        tiny_pipe("a red circle", num_inference_steps=3, seed=0, output_type="latent")
    assert maps and all(len(calls) == 3 for calls in maps.values())
    probs = next(iter(maps.values()))[0]
    assert probs.shape[0] == 2 and probs.shape[-1] == 77  # CFG batch of 2, 77 text tokens
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-4)
    assert all(m.capture is None for m in tiny_pipe.unet.modules() if hasattr(m, "capture"))  # restored


def test_configs_round_trip_and_presets():
    assert ModelConfig.from_json(SD15.to_json()) == SD15
    assert ModelConfig.from_json(TINY.to_json()) == TINY
    assert SD15.image_size == 512 and TINY.image_size == 64
    sd15_json = {"attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "in_channels": 4,
                 "layers_per_block": 2, "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 "some_future_key": 1}  # the 0.6.0 file: absent keys take diffusers' class defaults
    assert UNetConfig.from_diffusers(sd15_json) == SD15.unet
    sd2 = {**sd15_json, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True, "cross_attention_dim": 1024}
    cfg = UNetConfig.from_diffusers(sd2)
    assert cfg.num_heads == (5, 10, 20, 20) and cfg.use_linear_projection
    assert UNetConfig.from_diffusers({**sd15_json, "addition_embed_type": "text_time"}).addition_embed_type == "text_time"
    with pytest.raises(ValueError, match="addition_embed_type='image'"):
        UNetConfig.from_diffusers({**sd15_json, "addition_embed_type": "image"})
    assert json.loads(json.dumps(SD15.unet.to_diffusers()))["attention_head_dim"] == 8


def test_ddpm_clip_sample_keeps_x0_in_the_data_range():
    """Pixel-space DDPMs clip x̂₀ to [-1, 1] (diffusers' clip_sample): with a network that predicts
    ε = 0, x̂₀ = z/√ᾱ explodes at high noise; clipped, the last step lands in range."""
    from minisd.diffusion import samplers
    from minisd.diffusion.schedules import SchedulerConfig

    cfg = SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, timestep_spacing="leading",
                          steps_offset=0)
    s = samplers.make_schedule("ddpm", 50, cfg)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    plain = samplers.sample_ddpm(zero, z, s, generator=torch.Generator().manual_seed(1))
    clipped = samplers.sample_ddpm(zero, z, s, generator=torch.Generator().manual_seed(1), clip_sample=1.0)
    assert plain.abs().max() > 1.5 and clipped.abs().max() <= 1.0 + 1e-6
