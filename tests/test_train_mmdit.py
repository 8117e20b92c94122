"""`minisd train mmdit`: SD 3's transformer trained with rectified flow on the tiny model's latents and text.

adaLN-Zero's initialisation makes a fresh transformer output zero; the loss is the flow objective's
definition; a short run saves an SD 3 folder that `StableDiffusion.from_pretrained` reads back and
generates with, resumes from its checkpoint, and refuses careless flags; joint attention's image→text
maps are captured without changing the output.
"""

from __future__ import annotations

import json

import pytest
import torch

from minisd import StableDiffusion
from minisd.models.mmdit import MMDiT, MMDiTConfig
from minisd.nn.attention import capture_attention
from minisd.cli import main as cli_main
from minisd.shapes.train_mmdit import MMDiTTrainConfig, flow_loss, mmdit_config

SMALL = MMDiTConfig(sample_size=16, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
                    attention_head_dim=16, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
                    pos_embed_max_size=8, qk_norm="rms_norm")


def inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 7, 32, generator=g),
            torch.randn(batch, 32, generator=g), torch.tensor([250.0, 800.0][:batch]))


def test_adaln_zero_init_makes_every_block_the_identity_and_the_output_zero():
    torch.manual_seed(0)
    model = MMDiT(SMALL).init_adaln_zero_().eval()
    z, context, pooled, t = inputs()
    x = model.pos_embed(z)
    c = model.context_embedder(context)
    emb = model.time_text_embed(t, pooled)
    with torch.no_grad():
        c_out, x_out = model.transformer_blocks[0](x, c, emb)
        out = model(z, context, pooled, t)
    assert torch.equal(x_out, x) and torch.equal(c_out, c)
    assert torch.equal(out, torch.zeros_like(out))
    fresh = MMDiT(SMALL).eval()  # diffusers' default init: the checkpoint constructor, not zero
    with torch.no_grad():
        assert fresh(z, context, pooled, t).abs().max() > 0.01


def test_flow_loss_is_the_objectives_definition():
    torch.manual_seed(0)
    model = MMDiT(SMALL).eval()
    z0, context, pooled, t = inputs()
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    sigma = (t / 1000).view(-1, 1, 1, 1)
    x = (1 - sigma) * z0 + sigma * eps
    with torch.no_grad():
        expected = (model(x, context, pooled, t) - (eps - z0)).pow(2).mean()
        got = flow_loss(model, z0, t, eps, context, pooled)
    assert torch.allclose(got, expected, rtol=1e-6), (got, expected)


def test_config_follows_the_latents_and_the_text_encoder():
    cfg = mmdit_config(MMDiTTrainConfig(layers=3, heads=2, head_dim=24, qk_norm="none"), 4, 16, 128)
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size, cfg.pos_embed_max_size) == (4, 4, 16, 8)
    assert (cfg.joint_attention_dim, cfg.pooled_projection_dim, cfg.dim, cfg.qk_norm) == (128, 128, 48, None)


def test_capturing_joint_attention_keeps_the_output_and_records_image_to_text_maps():
    torch.manual_seed(0)
    model = MMDiT(SMALL).eval()
    z, context, pooled, t = inputs()
    with torch.no_grad():
        plain = model(z, context, pooled, t)
        with capture_attention(model) as maps:
            captured = model(z, context, pooled, t)
    diff = (plain - captured).abs()
    print(f"captured vs fused attention: max {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.max() < 1e-5
    assert sorted(maps) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    probs = maps["transformer_blocks.0.attn"][0]
    assert probs.shape == (2, 2, 64, 7)  # (B, heads, image tokens, text tokens)
    assert (probs.sum(-1) < 1).all()     # image rows also attend to the image: the text gets a share


def small_run(base, work, out, steps: int) -> list[str]:
    return ["train", "mmdit", "--n-images", "64", "--batch", "4", "--steps", str(steps), "--layers", "1", "--heads", "2",
            "--head-dim", "16", "--warmup", "1", "--base", str(base), "--work", str(work), "--out", str(out)]


def test_a_short_run_saves_an_sd3_folder_that_loads_generates_and_resumes(tiny_folder, tmp_path):
    out, work = tmp_path / "model", tmp_path / "work"
    assert cli_main(small_run(tiny_folder, work, out, steps=2)) == 0
    pipe = StableDiffusion.from_pretrained(out, dtype=torch.float32)
    assert type(pipe).__name__ == "StableDiffusion3" and pipe.backbone.config.num_layers == 1
    assert json.loads((out / "transformer" / "config.json").read_text())["_class_name"] == "SD3Transformer2DModel"
    record = json.loads((out / "training.json").read_text())
    assert record["command"] == "minisd train mmdit" and record["config"]["steps"] == 2
    pipe.progress = False
    images = pipe(["a red circle", "a blue square on the left"], num_inference_steps=2, seed=0, output_type="pt")
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    # a second run with more steps resumes from the checkpoint: step 2 on, not step 0
    assert cli_main(small_run(tiny_folder, work, tmp_path / "model3", steps=3)) == 0
    log = (work / "log.txt").read_text()
    assert "resumed" in log.lower() and "mmdit step 2" in log


@pytest.mark.parametrize("flag, value, message", [("--layers", "0", "--layers"), ("--qk-norm", "layer", "qk-norm"),
                                                  ("--flow-shift", "0", "flow-shift"), ("--lr", "-1", "lr")])
def test_careless_flags_are_refused_before_any_work(flag, value, message, tmp_path, capsys):
    code = cli_main(["train", "mmdit", flag, value, "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "w").exists()
