"""AnimateDiff's motion module: minisd's U-Net + MotionAdapter equal diffusers' UNetMotionModel (fp32, CPU),
diffusers' MotionAdapter checkpoints load with no key map, AnimateDiff's own layout converts, a fresh adapter
changes nothing."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from conftest import report

from minisd.formats.motion import (convert_original, infer_config, is_original, load_motion_adapter,
                                   save_motion_adapter)
from minisd.formats.weights import WeightsError, write_safetensors
from minisd.models.motion import ANIMATEDIFF_SD15_V2, MotionAdapter, MotionAdapterConfig, VideoUNet
from minisd.models.unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")

# SD 1.5's block layout, reduced: a cross-attention level, then a plain one; 2 heads everywhere
UNET = UNetConfig(block_out_channels=(32, 64), cross_attention=(True, False), layers_per_block=2, num_heads=(2, 2),
                  cross_attention_dim=32, sample_size=16)
MOTION = MotionAdapterConfig(block_out_channels=(32, 64), num_heads=(2, 2))
FRAMES = 8


def reference_adapter(cfg: MotionAdapterConfig):
    """diffusers' MotionAdapter, its proj_outs moved away from zero so that every motion module matters."""
    torch.manual_seed(0)
    adapter = diffusers.MotionAdapter(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if ".proj_out." in name:
                p.add_(0.1 * torch.randn_like(p))
    return adapter.eval()


def reference_unet(cfg: UNetConfig):
    torch.manual_seed(1)
    return diffusers.UNet2DConditionModel(**cfg.to_diffusers()).eval()


def ours(cls, cfg, state_dict):
    with torch.device("meta"):
        model = cls(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)  # strict: every name matches, no key map
    return model.eval()


def inputs(B: int = 2, context_dim: int = 32):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(B, 4, FRAMES, 16, 16, generator=g)  # (B, C, F, H, W)
    context = torch.randn(B, 77, context_dim, generator=g)
    return z, torch.tensor([999, 1])[:B], context


@pytest.mark.parametrize("mid_block", [True, False], ids=["v2-mid-block", "v1-no-mid-block"])
def test_video_unet_equals_diffusers(mid_block):
    cfg = replace(MOTION, mid_block=mid_block)
    ref_adapter, ref_unet = reference_adapter(cfg), reference_unet(UNET)
    model = VideoUNet(ours(UNet, UNET, ref_unet.state_dict()), ours(MotionAdapter, cfg, ref_adapter.state_dict()))
    ref = diffusers.UNetMotionModel.from_unet2d(ref_unet, ref_adapter).eval()
    z, t, context = inputs()
    with torch.no_grad():
        expected = ref(z, t, context.repeat_interleave(FRAMES, dim=0)).sample  # diffusers: one context per frame
        report(f"UNetMotionModel ({'mid block' if mid_block else 'no mid block'})", model(z, t, context), expected,
               rtol=1e-4)
        # folded as diffusers' pipelines feed it: (B·F, C, H, W), the frames of a video consecutive
        folded = model(z.transpose(1, 2).flatten(0, 1), t, context, num_frames=FRAMES)
        report("UNetMotionModel, folded input", folded, expected.transpose(1, 2).flatten(0, 1), rtol=1e-4)
    # the test can fail: without the motion modules the U-Net gives something else
    with torch.no_grad():
        frame_by_frame = model.unet(z.transpose(1, 2).flatten(0, 1), t.repeat_interleave(FRAMES),
                                    context.repeat_interleave(FRAMES, dim=0))
    assert (frame_by_frame - expected.transpose(1, 2).flatten(0, 1)).abs().max() > 1e-2


def test_fresh_adapter_changes_nothing():
    torch.manual_seed(0)
    unet = UNet(UNET).eval()
    adapter = MotionAdapter(MOTION)
    assert all(p.abs().max() == 0 for n, p in adapter.named_parameters() if ".proj_out." in n)
    x = torch.randn(2 * FRAMES, 64, 4, 4)  # (B·F, C, H, W)
    with torch.no_grad():
        assert torch.equal(adapter.down_blocks[1].motion_modules[0](x, FRAMES), x)  # each module: the identity
    z, t, context = inputs()
    frames = z.transpose(1, 2).flatten(0, 1)  # (B·F, C, H, W)
    with torch.no_grad():
        video = VideoUNet(unet, adapter)(frames, t, context, num_frames=FRAMES)
        image = unet(frames, t.repeat_interleave(FRAMES), context.repeat_interleave(FRAMES, dim=0))
    # the whole network: equal up to rounding, as the time MLP runs on B rows here (as in diffusers), B·F there
    report("fresh adapter vs the image U-Net frame by frame", video, image, rtol=1e-6)


def test_sd15_adapter_names_and_shapes():
    """The full SD 1.5 adapter (guoyww/animatediff-motion-adapter-v1-5-2's config) on the meta device."""
    with torch.device("meta"):
        ref = diffusers.MotionAdapter(**{k: v for k, v in ANIMATEDIFF_SD15_V2.to_diffusers().items()
                                         if k != "_class_name"})
        model = MotionAdapter(ANIMATEDIFF_SD15_V2)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    # 4·2 down + 1 mid + 4·3 up = 21 motion modules of 27 tensors: norm, proj_in, proj_out (6) and one block
    # (norm1-3: 6, attn1 and attn2: 5 each, ff: 4, position table: 1)
    assert len(expected) == 21 * 27
    assert MotionAdapterConfig.from_diffusers(dict(ref.config)) == ANIMATEDIFF_SD15_V2


def original_name(key: str) -> list[str]:
    """The AnimateDiff name(s) of a diffusers key, from guoyww/AnimateDiff's animatediff/models/motion_module.py:
    VanillaTemporalModule.temporal_transformer, TemporalTransformerBlock.attention_blocks/norms/ff_norm,
    one PositionalEncoding per attention block."""
    key = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
    if key.endswith(".pos_embed.pe"):
        return [key.replace(".pos_embed.", f".attention_blocks.{i}.pos_encoder.") for i in (0, 1)]
    for new, old in ((".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."),
                     (".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm.")):
        key = key.replace(new, old)
    return [key]


def test_original_layout_converts_every_sd15_key():
    with torch.device("meta"):
        names = list(MotionAdapter(ANIMATEDIFF_SD15_V2).state_dict())
    table = torch.zeros(1, 32, 4)  # stand-ins: the converter renames, load_strict checks shapes
    original = {o: table if o.endswith(".pe") else torch.zeros(0) for k in names for o in original_name(k)}
    assert is_original(original) and len(original) == len(names) + 21
    assert sorted(convert_original(original, "mm_sd_v15_v2")) == sorted(names)
    # diffusers' own converter agrees on every name (it drops the position tables)
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
    theirs = convert_animatediff_checkpoint_to_diffusers(original)
    assert sorted(theirs) == sorted(k for k in names if not k.endswith(".pos_embed.pe"))


def test_load_diffusers_folder_and_original_file(tmp_path):
    ref = reference_adapter(MOTION)
    ref.save_pretrained(tmp_path / "diffusers")
    adapter = load_motion_adapter(tmp_path / "diffusers")
    assert adapter.config == MOTION
    expected = ref.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in adapter.state_dict().items())
    # AnimateDiff's layout, one file: same tensors, config read from the weights
    original = {o: v.clone() for k, v in expected.items() for o in original_name(k)}
    write_safetensors(original, tmp_path / "mm.safetensors")
    again = load_motion_adapter(tmp_path / "mm.safetensors", base=MOTION)  # heads: not in the weights
    assert again.config == MOTION and all(torch.equal(v, expected[k]) for k, v in again.state_dict().items())
    # without position tables (as diffusers' converter writes them) they are the fixed sinusoid
    learned = {k: v for k, v in original.items() if not k.endswith(".pe")}
    write_safetensors(learned, tmp_path / "no_pe.safetensors")
    assert all(torch.equal(v, expected[k]) for k, v in load_motion_adapter(tmp_path / "no_pe.safetensors", base=MOTION)
               .state_dict().items())
    # minisd's folder reads back in diffusers
    save_motion_adapter(adapter, tmp_path / "ours")
    theirs = diffusers.MotionAdapter.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(v, expected[k]) for k, v in theirs.state_dict().items())


def test_v1_files_have_24_positions():
    with torch.device("meta"):
        names = MotionAdapter(replace(MOTION, mid_block=False)).state_dict()
    sd = {k: torch.zeros(1, 24, v.shape[-1]) if k.endswith(".pe") else torch.zeros(v.shape) for k, v in names.items()}
    assert infer_config(sd, MOTION) == replace(MOTION, mid_block=False, max_seq_length=24)


def test_bad_input():
    torch.manual_seed(0)
    unet = UNet(UNET).eval()
    video = VideoUNet(unet, MotionAdapter(replace(MOTION, max_seq_length=4)))
    z, t, context = inputs(B=1)
    with pytest.raises(ValueError, match="at most 4"):
        video(z, t, context)
    with pytest.raises(ValueError, match="num_frames"):
        video(z[:, :, 0], t, context)
    with pytest.raises(ValueError, match="block_out_channels"):
        VideoUNet(unet, MotionAdapter(replace(MOTION, block_out_channels=(32, 32))))
    with pytest.raises(ValueError, match="divide by heads 3"):
        MotionAdapterConfig(block_out_channels=(32, 64), num_heads=(3, 2))
    with pytest.raises(WeightsError, match="outside"):
        convert_original({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1),
                          "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": torch.zeros(1)}, "x.ckpt")
    with pytest.raises(ValueError, match="conv_in_channels"):
        MotionAdapterConfig.from_diffusers({"conv_in_channels": 9})
