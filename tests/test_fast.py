"""The speed and memory switches (fast.py): each one gives the same pictures as without it (or, for
int8, measurably close ones), and can be switched off again."""

from __future__ import annotations

import copy

import pytest
import torch

from minisd import StableDiffusion, fast

PROMPTS = ["a red circle on the left", "a small blue square at the top"]


@pytest.fixture(scope="module")
def tiny():
    pipe = StableDiffusion.from_pretrained("tiny", device="cpu")
    pipe.progress = False
    return pipe


@pytest.fixture(scope="module")
def reference(tiny):
    return tiny(PROMPTS, num_inference_steps=6, seed=0, output_type="pt")


def unet_inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = pipe.unet.config
    z = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    ctx = pipe.encode_text(PROMPTS)
    return z, torch.tensor([500, 20]), ctx


def test_fused_qkv_gives_the_same_output_and_leaves_the_state_dict_alone(tiny, reference):
    pipe = copy.deepcopy(tiny)
    z, t, ctx = unet_inputs(pipe)
    with torch.no_grad():
        before = pipe.unet(z, t, ctx)
    keys = list(pipe.unet.state_dict())
    pipe.fuse_qkv_projections()
    with torch.no_grad():
        after = pipe.unet(z, t, ctx)
    print(f"fused QKV: U-Net max |diff| {(after - before).abs().max():.2e}")
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-5)
    assert list(pipe.unet.state_dict()) == keys  # nothing new to save
    images = pipe(PROMPTS, num_inference_steps=6, seed=0, output_type="pt")
    assert (images - reference).abs().max() < 1e-4
    with pytest.raises(RuntimeError, match="unfuse_qkv_projections"):
        pipe.load_lora("data/tiny_star_lora")
    pipe.unfuse_qkv_projections()
    with torch.no_grad():
        assert torch.equal(pipe.unet(z, t, ctx), before)


def test_fusing_refuses_projections_that_carry_loras(tiny):
    pipe = copy.deepcopy(tiny)
    pipe.load_lora("data/tiny_star_lora")
    with pytest.raises(RuntimeError, match="LoRAs are attached"):
        pipe.fuse_qkv_projections()


def test_int8_refuses_layers_that_carry_loras(tiny):
    pipe = copy.deepcopy(tiny)
    pipe.load_lora("data/tiny_star_lora")
    with pytest.raises(RuntimeError, match=r"carries LoRAs .*unload_lora"):
        fast.quantize_int8(pipe.unet)
    assert not any(isinstance(m, fast.Int8Linear) for m in pipe.unet.modules())  # nothing half-quantized


def test_attention_slicing_gives_the_same_pictures(tiny, reference):
    pipe = copy.deepcopy(tiny)
    pipe.enable_attention_slicing(7)  # 256 queries at the top level: 37 slices, the last one short
    sliced = pipe(PROMPTS, num_inference_steps=6, seed=0, output_type="pt")
    print(f"attention slicing: image max |diff| {(sliced - reference).abs().max():.2e}")
    assert (sliced - reference).abs().max() < 1e-5
    pipe.disable_attention_slicing()
    assert all(m.slice_size is None for m in fast._attentions(pipe.unet))
    with pytest.raises(ValueError, match="slice_size"):
        pipe.enable_attention_slicing(0)


@pytest.mark.parametrize("mode, tolerance", [("weight-only", 0.02), ("dynamic", 0.02), ("fp8", 0.05)])
def test_quantized_weights_are_close_and_smaller(tiny, reference, mode, tolerance):
    """int8 (weight-only, dynamic) and float8 Linear layers: a quarter of the weight bytes, close outputs
    (e4m3's 3 mantissa bits round more coarsely than int8's 127 steps per channel)."""
    pipe = copy.deepcopy(tiny)
    z, t, ctx = unet_inputs(pipe)
    with torch.no_grad():
        before = pipe.unet(z, t, ctx)
    report = fast.quantize_fp8(pipe.unet) if mode == "fp8" else fast.quantize_int8(pipe.unet, mode=mode)
    with torch.no_grad():
        after = pipe.unet(z, t, ctx)
    rel = ((after - before).norm() / before.norm()).item()
    images = pipe(PROMPTS, num_inference_steps=6, seed=0, output_type="pt")
    img = (images - reference).abs().mean().item()
    print(f"{mode}: {report['layers']} Linear layers, {report['bytes_before'] / 1e6:.2f} MB -> "
          f"{report['bytes_after'] / 1e6:.2f} MB; U-Net relative error {rel:.2e}; image mean |diff| {img:.2e}")
    assert report["layers"] > 0 and report["bytes_after"] < 0.3 * report["bytes_before"]
    assert rel < tolerance and img < tolerance
    kind = fast.Float8Linear if mode == "fp8" else fast.Int8Linear
    assert sum(isinstance(m, kind) for m in pipe.unet.modules()) == report["layers"]


def test_int8_rejects_an_unknown_mode(tiny):
    with pytest.raises(ValueError, match="mode"):
        fast.Int8Linear(torch.nn.Linear(8, 8), mode="int4")


def test_model_cpu_offload_moves_one_component_at_a_time(tiny, reference):
    pipe = copy.deepcopy(tiny)
    pipe.enable_model_cpu_offload("cpu")  # the mechanics, on the only device here; the GPU run is in benchmarks/
    seen = []
    pipe._offload.use = lambda name, use=pipe._offload.use: (seen.append(name), use(name))
    images = pipe(PROMPTS, num_inference_steps=6, seed=0, output_type="pt")
    assert torch.equal(images, reference)
    assert seen[0] == "text_encoder" and "unet" in seen and seen[-1] == "vae"
    assert pipe.device == torch.device("cpu")
    pipe.disable_model_cpu_offload()
    assert pipe._offload is None and not pipe.unet._forward_pre_hooks


def test_timesteps_on_the_device_give_the_same_steps(tiny):
    from minisd.diffusion import denoisers as dn

    cond, uncond = tiny.encode_prompt(PROMPTS)
    ts = torch.tensor([981.0, 961.0])
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    on_device = dn.timesteps_on_device(ts, cond.device)
    assert on_device(ts[1]) is on_device(torch.tensor(961.0))  # copied once, looked up at every step
    plain = dn.with_cfg(dn.unet_backbone(tiny.unet, lambda t: t), cond, uncond, 7.5)
    hoisted = dn.with_cfg(dn.unet_backbone(tiny.unet, on_device), cond, uncond, 7.5)
    assert torch.equal(plain(z, ts[1]), hoisted(z, ts[1]))
    assert torch.equal(plain(z, torch.tensor(3.0)), hoisted(z, torch.tensor(3.0)))  # not in the table


def test_fp8_layer_is_the_scaled_matmul_of_its_rounded_operands():
    """Float8Linear = s_x s_w (x_8 W_8ᵀ) + b: checked against the same product in float32 from the rounded
    operands, and within e4m3's rounding (3 mantissa bits) of the float32 layer."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    x = torch.randn(2, 16, 64, generator=g)
    layer = fast.Float8Linear(linear)
    with torch.no_grad():
        y, exact = layer(x), linear(x)
        sx = x.abs().max() / fast.FP8_MAX
        by_hand = ((x / sx).to(fast.FP8).float() * sx) @ (layer.weight_fp8.float() * layer.scale).t() + linear.bias
    rel = ((y - exact).norm() / exact.norm()).item()
    print(f"fp8 Linear: max |diff| to the rounded operands' product {(y - by_hand).abs().max():.1e}; "
          f"relative error to float32 {rel:.3f}")
    assert torch.allclose(y, by_hand, atol=1e-4) and 1e-4 < rel < 0.05
    odd = fast.Float8Linear(torch.nn.Linear(72, 40))         # not multiples of 16: the dequantised weight
    with torch.no_grad():
        assert odd(torch.randn(3, 72, generator=g)).shape == (3, 40)
