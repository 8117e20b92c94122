"""The training script runs end to end, resumes, and its losses fall where they must."""

from __future__ import annotations

import json
import re

import pytest
import torch

from minisd import StableDiffusion
from minisd.shapes.train import batch_indices, use_bf16
from minisd.shapes.train import main as train_main

SMALL = ["--n-images", "120", "--vae-steps", "4", "--vae-batch", "8", "--vae-decoder-steps", "0", "--vae-contrast-steps", "0",
         "--clip-steps", "4", "--clip-batch", "16",
         "--unet-steps", "6", "--unet-batch", "8", "--warmup", "2", "--sample-steps", "2", "--unet-refine-steps", "0"]
AFTER_VAE = ["--clip-steps", "1", "--clip-batch", "8", "--unet-steps", "1", "--unet-batch", "4", "--warmup", "1",
             "--sample-steps", "1", "--unet-refine-steps", "0"]  # the stages after the VAE, as short as can be


def test_recipe_runs_end_to_end_and_resumes(tmp_path):
    out, work = tmp_path / "model", tmp_path / "work"
    train_main(["all", "--out", str(out), "--work", str(work), *SMALL])
    pipe = StableDiffusion.from_pretrained(out, device="cpu")  # the ordinary loader reads what training wrote
    assert pipe.image_size == 64 and (work / "timings.json").is_file()
    assert abs(pipe.vae.scaling_factor - 1.0) < 10  # measured from the data, written into vae/config.json
    first = json.loads((work / "timings.json").read_text())
    assert set(first) >= {"data", "vae", "clip", "unet"}
    # resume the U-Net, with a refining phase after step 6: restarted from the EMA weights (and, on the
    # way, the two-object share and bfloat16 autocast)
    with pytest.raises(ValueError, match=r"^--out .* already holds files; pass --force"):
        train_main(["unet", "--out", str(out), "--work", str(work), *SMALL])
    train_main(["unet", "--out", str(out), "--work", str(work), *SMALL[:-2], "--unet-refine-steps", "3",
                "--unet-refine-lr", "1e-4", "--unet-two-share", "0.7", "--bf16", "yes", "--force"])
    log = (work / "log.txt").read_text()
    assert "unet: bfloat16 autocast" in log
    assert "unet: resumed at step 6" in log and "vae: resumed" not in log.split("unet: resumed")[0][-200:]
    assert "unet step 6: refining from the EMA weights at lr 1.0e-04" in log
    second = json.loads((work / "timings.json").read_text())
    assert second["unet"] > first["unet"] and second["vae"] == first["vae"]  # resumed time adds up


def test_two_object_share_and_bf16_setting():
    two = torch.tensor([i % 4 == 0 for i in range(400)])  # a quarter of the scenes have two objects
    g = torch.Generator().manual_seed(0)
    uniform = torch.cat([batch_indices(two, 64, 0.0, g) for _ in range(50)])
    mixed = torch.cat([batch_indices(two, 64, 0.7, g) for _ in range(50)])
    assert abs(two[uniform].float().mean() - 0.25) < 0.03
    assert abs(two[mixed].float().mean() - 0.7) < 0.01 and mixed.max() < 400
    cpu = torch.device("cpu")
    assert use_bf16("no", cpu) is False and use_bf16("yes", cpu) is True
    with pytest.raises(ValueError, match="'maybe'"):
        use_bf16("maybe", cpu)


def test_diffusion_loss_weight_per_latent_cell(tiny_pipe):
    """`weight` (the star LoRA's notch weighting) scales each cell's squared error: ones change nothing,
    and a weight on one cell adds exactly that cell's error."""
    from minisd.shapes.train import diffusion_loss

    torch.manual_seed(0)
    unet = tiny_pipe.unet
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    t, alpha_bar = torch.tensor([100, 700]), tiny_pipe.scheduler.alphas_cumprod()
    with torch.no_grad():
        plain = diffusion_loss(unet, z0, t, eps, context, alpha_bar, None)
        ones = diffusion_loss(unet, z0, t, eps, context, alpha_bar, None, weight=torch.ones(2, 1, 8, 8))
        w = torch.ones(2, 1, 8, 8)
        w[:, :, 3, 4] = 11
        weighted = diffusion_loss(unet, z0, t, eps, context, alpha_bar, None, weight=w)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        err = (unet(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, context) - eps).pow(2)
    assert torch.allclose(plain, ones)
    assert torch.allclose(weighted, plain + 10 * err[:, :, 3, 4].sum(1).mean() / (4 * 8 * 8))


def test_lora_loss_weights_look_at_notches_and_outlines():
    """The star LoRA's loss weights: a star's notches and every object's outline weigh more, and each
    picture's weights average 1 (star pictures do not outweigh the ordinary ones); 0, 0 is the plain loss."""
    from minisd import shapes
    from minisd.shapes.finetune import loss_weights

    scenes = [shapes.Scene("white", [shapes.ShapeObject("blue", shape, "small", "left", (16, 32))])
              for shape in ("star", "triangle")]
    images = torch.stack([shapes.to_tensor(shapes.render(s)) for s in scenes])
    quiet = lambda *_: None  # noqa: E731
    assert torch.equal(loss_weights(scenes, images, 16, 0, 0, quiet), torch.ones(2, 1, 16, 16))
    w = loss_weights(scenes, images, 16, 300, 100, quiet)
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.ones(2))
    notched = loss_weights(scenes, images, 16, 300, 0, quiet)
    assert torch.equal(notched[1], torch.ones(1, 16, 16))  # a triangle has no notches
    star_cells = torch.from_numpy(shapes.notches(scenes[0], 16)) > 0
    assert notched[0, 0][star_cells].min() > 1 > notched[0, 0][~star_cells].max()  # the weight moves onto them
    y, x = divmod(int(w[1].argmax()), 16)  # the triangle's heaviest cell: on its outline (box x 9-23, y 25-39 px)
    assert 9 <= 4 * x + 2 <= 23 and 25 <= 4 * y + 2 <= 39 and w[1, 0, y, x] > 1 > w[1, 0, 0, 15]  # not the corner


def test_bf16_autocast_gradients_match_fp32(tiny_pipe):
    """`--bf16`: the U-Net's forward under bfloat16 autocast gives nearly fp32's loss and gradients."""
    from minisd.shapes.train import diffusion_loss

    torch.manual_seed(0)
    unet = tiny_pipe.unet
    z0, eps = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    context = torch.randn(8, 77, unet.config.cross_attention_dim)
    t = torch.randint(0, 1000, (8,))
    alpha_bar = tiny_pipe.scheduler.alphas_cumprod()

    def grads(bf16: bool):
        unet.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(unet, z0, t, eps, context, alpha_bar)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])

    try:
        (l32, g32), (l16, g16) = grads(False), grads(True)
    finally:
        unet.zero_grad(set_to_none=True)
    rel = ((g16 - g32).norm() / g32.norm()).item()
    print(f"loss fp32 {l32:.5f}, bf16 {l16:.5f}; gradient relative difference {rel:.4f}")
    assert abs(l16 - l32) < 0.02 * l32 and rel < 0.05


def test_unet_loss_falls_on_a_memorised_batch(tiny_pipe):
    """ε-prediction on one fixed batch: a working U-Net and loss must memorise it."""
    torch.manual_seed(0)
    unet = tiny_pipe.unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    z0 = torch.randn(4, 4, 8, 8)
    context = torch.randn(4, 77, tiny_pipe.unet.config.cross_attention_dim)
    t = torch.tensor([100, 300, 500, 700])
    eps = torch.randn_like(z0)
    abar = tiny_pipe.scheduler.alphas_cumprod()[t].view(-1, 1, 1, 1)
    z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
    losses = []
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    try:
        for _ in range(40):
            loss = (unet(z_t, t, context) - eps).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        unet.load_state_dict(state)
        unet.eval()
    assert losses[-1] < 0.3 * losses[0], losses[::8]


def test_clip_hard_negatives_swap_exactly_one_attribute():
    """Each two-object scene gets a negative caption: same words named, colours/shapes/positions swapped."""
    import numpy as np

    from minisd import shapes
    from minisd.shapes.train import captions_with_negatives

    scenes = [shapes.make_scene(i) for i in range(200)]
    captions, negatives = captions_with_negatives(scenes, list(range(200)), np.random.default_rng(0))
    two = [i for i, s in enumerate(scenes) if len(s.objects) == 2]
    assert len(captions) == 200 and len(negatives) == len(two) > 50
    for i, neg in zip(two, negatives):
        assert neg != captions[i]
        assert sorted(neg.split()) == sorted(captions[i].split())  # the same words, bound differently


def test_adapter_training_runs_saves_and_loads(tiny_folder, tmp_path):
    """`minisd train lora|controlnet`: a few steps on the small SD-1.5-layout model, files the loaders read."""
    from minisd.shapes.finetune import AdapterConfig
    from minisd.shapes.finetune import main as finetune_main

    common = ["--model", str(tiny_folder), "--n-images", "24", "--steps", "3", "--batch", "4"]
    lora_dir = finetune_main(["lora", "--out", str(tmp_path / "lora"), "--work", str(tmp_path / "lw"), *common,
                              "--bf16", "yes"])
    log = (tmp_path / "lw" / "log.txt").read_text()
    assert "lora: bfloat16 autocast" in log
    assert re.search(r"loss weights: 1 \+ 300 · notch \+ 100 · outline, averaging 1 a picture; "
                     r"[1-9]\d* of 24 pictures with notches", log)  # AdapterConfig's defaults; stars among them
    cn_dir = finetune_main(["controlnet", "--out", str(tmp_path / "cn"), "--work", str(tmp_path / "cw"), *common])
    pipe = StableDiffusion.from_pretrained(tiny_folder, device="cpu")
    pipe.progress = False
    assert pipe.load_lora(lora_dir) == "lora"
    assert pipe.load_lora(lora_dir / "lora_kohya.safetensors") == "lora_kohya"
    from torch import nn

    targets = AdapterConfig().targets.split(",")
    expected = sum(isinstance(m, (nn.Linear, nn.Conv2d)) and n.endswith(tuple(targets)) for n, m in pipe.unet.named_modules())
    assert len(pipe.loras["lora"]) == expected > 12 * 16  # 12 layers in each of 16 transformer blocks, + convs
    pipe.load_controlnet(cn_dir)
    from minisd import shapes

    scene = shapes.make_scene(3)
    image = pipe(scene.caption, control_image=shapes.control_map(scene), num_inference_steps=2, output_type="pt")
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert "controlnet step 2" in (tmp_path / "cw" / "log.txt").read_text()


def test_lora_training_can_include_the_text_encoder(tiny_folder, tmp_path):
    """--te-targets: LoRAs on the text encoder too (kohya's lora_te_), trained, saved in both layouts, loaded."""
    from safetensors.torch import load_file

    from minisd.shapes.finetune import main as finetune_main

    out = finetune_main(["lora", "--model", str(tiny_folder), "--n-images", "24", "--steps", "3", "--batch", "4",
                         "--out", str(tmp_path / "lora"), "--work", str(tmp_path / "lw"), "--targets", "to_k,to_v",
                         "--te-targets", "q_proj,v_proj", "--te-lr-scale", "0.5", "--lr", "0.01"])
    peft, kohya = load_file(out / "pytorch_lora_weights.safetensors"), load_file(out / "lora_kohya.safetensors")
    te_up = [v for k, v in peft.items() if k.startswith("text_encoder.") and k.endswith("lora_B.weight")]
    assert te_up and all(v.abs().max() > 0 for v in te_up)  # B starts at zero: these were trained
    assert {v.dtype for v in peft.values()} == {torch.float16}  # shipped in fp16, as the base model
    assert any(k.startswith("lora_te_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)
    pipe = StableDiffusion.from_pretrained(tiny_folder, device="cpu")
    ids = pipe.tokenizer(["a red star"])
    before = pipe.text_encoder(ids)
    pipe.load_lora(out)
    assert any(p.startswith("text_encoder.") for p in pipe.loras["lora"])
    assert not torch.allclose(pipe.text_encoder(ids), before)


def test_inpainting_model_starts_as_the_base_model_and_trains(tiny_folder, tmp_path):
    """`minisd train inpaint`: conv_in widened to 9 channels with zero weights (so it predicts what the
    base U-Net predicts, whatever the mask), then a few steps, saved as a pipeline the loader reads."""
    from minisd.shapes.finetune import inpainting_unet, random_masks
    from minisd.shapes.finetune import main as finetune_main

    base = StableDiffusion.from_pretrained(tiny_folder, device="cpu")
    unet9 = inpainting_unet(base.unet)
    g = torch.Generator().manual_seed(0)
    c = base.unet.config
    z = torch.randn(2, 4, c.sample_size, c.sample_size, generator=g)
    extra = torch.randn(2, 5, c.sample_size, c.sample_size, generator=g)
    ctx = base.encode_text(["a red circle", "a blue square"])
    with torch.no_grad():
        diff = (unet9(torch.cat([z, extra], 1), torch.tensor([10, 900]), ctx)
                - base.unet(z, torch.tensor([10, 900]), ctx)).abs().max()
    assert diff < 1e-5  # zero weights on the new channels: float rounding of a longer sum only
    import numpy as np

    from minisd import shapes

    scenes = [shapes.make_scene(i) for i in range(40)]
    for s in scenes:
        shapes.render(s)  # sets the boxes
    masks = random_masks(scenes, list(range(40)), np.random.default_rng(0))
    assert masks.shape == (40, 1, 64, 64) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.flatten(1).mean(1) == 1).any() and (masks.flatten(1).mean(1) < 0.5).any()

    out = finetune_main(["inpaint", "--model", str(tiny_folder), "--n-images", "24", "--steps", "3", "--batch", "4",
                         "--out", str(tmp_path / "inpaint"), "--work", str(tmp_path / "iw")])
    pipe = StableDiffusion.from_pretrained(out, device="cpu")
    pipe.progress = False
    assert pipe.unet.config.in_channels == 9
    scene = shapes.make_scene(3)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:] = 1
    image = pipe.inpaint(scene.caption, shapes.render(scene), mask, num_inference_steps=2, output_type="pt")
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_controlnet_captions_never_say_where():
    import numpy as np

    from minisd import shapes

    rng = np.random.default_rng(0)
    caps = [shapes.make_caption(shapes.make_scene(i), rng, positions=False) for i in range(100)]
    assert not any(w in c for c in caps for w in ("left", "right", "top", "bottom", "center"))
    assert any(" and " in c for c in caps)


def test_vae_clutter_mixes_random_polygons_into_vae_batches(tmp_path):
    from minisd import shapes

    a, b = shapes.clutter(5), shapes.clutter(5)
    assert a.size == (64, 64) and a.tobytes() == b.tobytes() and a.tobytes() != shapes.clutter(6).tobytes()
    work = tmp_path / "work"
    train_main(["vae", "--out", str(tmp_path / "model"), "--work", str(work), *SMALL[:10], "--vae-clutter", "0.25",
                *AFTER_VAE])
    assert "vae: 2 of every 8 pictures from 30 clutter pictures" in (work / "log.txt").read_text()
    spiky = [shapes.clutter(i, spiky=1.0) for i in range(3)]  # every polygon pointed instead
    assert all(im.tobytes() != shapes.clutter(i).tobytes() for i, im in enumerate(spiky))
    assert shapes.clutter(5, spiky=0.0).tobytes() == a.tobytes()  # spiky 0: the pictures as before


def test_edge_weighted_reconstruction_loss():
    from minisd import shapes
    from minisd.shapes.train import edge_map, reconstruction_loss

    x = shapes.to_tensor(shapes.render(shapes.make_scene(3)))[None]
    edges = edge_map(x)
    assert edges.shape == (1, 1, 64, 64) and 0 < edges.mean() < 0.3  # outlines, not the whole picture
    flat = torch.full_like(x, 0.3)
    assert edge_map(flat).sum() == 0
    x_hat = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    plain = torch.nn.functional.l1_loss(x_hat, x) + torch.nn.functional.mse_loss(x_hat, x)
    assert torch.allclose(reconstruction_loss(x_hat, x), plain)  # weight 0: the old L1 + MSE exactly
    # the same error on as many pixels, on the outlines or off them: weighted, the outlines cost more
    off = (1 - edges).flatten().nonzero()[: int(edges.sum())].squeeze(1)
    elsewhere = torch.zeros(64 * 64).index_fill_(0, off, 1.0).view(1, 1, 64, 64)
    assert reconstruction_loss(x + 0.5 * edges, x) == reconstruction_loss(x + 0.5 * elsewhere, x)
    assert reconstruction_loss(x + 0.5 * edges, x, 10) > 3 * reconstruction_loss(x + 0.5 * elsewhere, x, 10)


def test_vae_decoder_phase_trains_the_decoder_alone(tmp_path):
    """`--vae-decoder-steps`: after the joint steps only the decoder moves, so the latents (and a U-Net
    trained on them) stay valid — SD's ft-MSE decoder was made the same way."""
    from minisd.shapes.train import load_checkpoint

    work, args = tmp_path / "work", ["--out", str(tmp_path / "model"), *SMALL[:10], "--vae-clutter", "0"]
    train_main(["vae", "--work", str(work), *args, *AFTER_VAE])
    joint = load_checkpoint(work / "vae.pt")["model"]
    train_main(["vae", "--work", str(work), *args, "--vae-decoder-steps", "3", "--vae-contrast-steps", "2", *AFTER_VAE,
                "--force"])
    ck = load_checkpoint(work / "vae.pt")
    log = (work / "log.txt").read_text()
    assert ck["step"] == 4 + 3 + 2 and "vae step 4: the decoder alone from here" in log
    assert "vae step 7: half the decoder's latents over-contrasted" in log
    moved = {k for k, v in ck["model"].items() if not torch.equal(v, joint[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved)
    assert any(k.startswith("decoder.") for k in moved)


def test_over_contrast_scales_each_pictures_contrast_and_keeps_its_mean():
    from minisd.shapes.train import over_contrast

    z = torch.randn(64, 4, 16, 16)
    same = over_contrast(z, 1.3, torch.Generator().manual_seed(0), share=0.0)
    assert torch.equal(same, z)
    out = over_contrast(z, 1.3, torch.Generator().manual_seed(0), share=1.0)
    m = z.mean((2, 3), keepdim=True)
    torch.testing.assert_close(out.mean((2, 3), keepdim=True), m, atol=1e-5, rtol=0)
    k = ((out - m).flatten(1).norm(dim=1) / (z - m).flatten(1).norm(dim=1))
    assert k.min() >= 1 and k.max() <= 1.3 and k.std() > 0.05  # one k per picture, spread over [1, 1.3]
    half = over_contrast(z, 1.3, torch.Generator().manual_seed(0))
    assert 16 < sum(not torch.equal(a, b) for a, b in zip(half, z)) < 48  # about half of them


REFUSED = [  # careless input -> the start of the one-line ValueError, raised before any work
    (["all", "--n-images", "0"], "--n-images must be at least 1, got 0"),
    (["all", "--vae-batch", "0"], "--vae-batch must be at least 1, got 0"),
    (["unet", "--unet-steps", "-3"], "--unet-steps must be at least 1, got -3"),
    (["all", "--vae-decoder-steps", "-1"], "--vae-decoder-steps must be 0 or more, got -1"),
    (["all", "--bf16", "maybe"], "--bf16 must be one of 'yes', 'no', 'auto', got 'maybe'"),
    (["all", "--unet-lr", "nan"], "--unet-lr must be a finite number, got nan"),
    (["all", "--clip-lr", "0"], "--clip-lr must be a number above 0, got 0.0"),
    (["all", "--caption-dropout", "1.5"], "--caption-dropout must be a share between 0 and 1, got 1.5"),
    (["all", "--vae-contrast", "0.5"], "--vae-contrast must be at least 1 (1: no change), got 0.5"),
    (["all", "--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["all", "--device", "gpu0"], "--device must be a torch device such as 'cpu' or 'cuda', got 'gpu0'"),
    (["lora", "--rank", "0"], "--rank must be at least 1, got 0"),
    (["lora", "--steps", "-1"], "--steps must be at least 1, got -1"),
    (["lora", "--lr", "inf"], "--lr must be a finite number, got inf"),
    (["lora", "--alpha", "0"], "--alpha must be a number above 0, got 0.0"),
    (["lora", "--concept", "hexagon"], "--concept must be one of 'circle', 'square', 'triangle', 'star', got 'hexagon'"),
    (["lora", "--notch-weight", "-1"], "--notch-weight must be a number >= 0, got -1.0"),
    (["lora", "--targets", ","], "--targets must name at least one layer"),
    (["controlnet", "--batch", "0"], "--batch must be at least 1, got 0"),
    (["controlnet", "--control", "depth"], "--control must be one of 'edges', 'mask', got 'depth'"),
    (["inpaint", "--n-images", "0"], "--n-images must be at least 1, got 0"),
    (["inpaint", "--bf16", "maybe"], "--bf16 must be one of 'yes', 'no', 'auto', got 'maybe'"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_careless_input_is_refused_before_any_work(argv, message, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(ValueError) as info:
        train_main([*argv, "--work", str(work), "--out", str(tmp_path / "out")])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not work.exists()  # refused before the log, the data or any stage


@pytest.mark.parametrize("kind", ["all", "lora"])
def test_an_existing_model_is_kept_without_force(kind, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    (out / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"^--out {out} already holds files; pass --force to overwrite them"):
        train_main([kind, "--out", str(out), "--work", str(work)])
    assert not work.exists() and (out / "model_index.json").read_text() == "{}"


def test_default_outputs_are_outside_the_shipped_models():
    from minisd.shapes.finetune import AdapterConfig
    from minisd.shapes.train import TrainConfig

    assert TrainConfig().out == "runs/tiny/model"
    assert [str(AdapterConfig(kind=k).paths()[0]) for k in ("lora", "controlnet", "inpaint")] == \
        ["runs/lora/tiny_star_lora", "runs/controlnet/tiny_controlnet_edges", "runs/inpaint/tiny_inpaint"]


def test_a_resumed_unet_keeps_its_whole_loss_history(tmp_path, monkeypatch):
    """Killed at step 5 (checkpoints every step), then resumed: the curve still starts at step 0."""
    from minisd.shapes import train
    from minisd.shapes.train import load_checkpoint

    work = tmp_path / "work"
    argv = ["unet", "--out", str(tmp_path / "model"), "--work", str(work), *SMALL[:10], "--vae-clutter", "0",
            *AFTER_VAE[:-6], "--unet-steps", "12", "--unet-refine-steps", "0", "--checkpoint-minutes", "1e-9"]
    ema_update = train.ema_update

    def killed_at_5(ema, model, step, decay):
        if step == 5:
            raise KeyboardInterrupt
        return ema_update(ema, model, step, decay)

    monkeypatch.setattr(train, "ema_update", killed_at_5)
    with pytest.raises(KeyboardInterrupt):
        train_main(argv)
    before = load_checkpoint(work / "unet.pt")
    assert before["step"] == 5 and len(before["losses"]) == 5
    monkeypatch.setattr(train, "ema_update", ema_update)
    train_main(argv)
    after = load_checkpoint(work / "unet.pt")
    assert after["step"] == 12 and torch.equal(after["losses"][:5], before["losses"])
    curve = json.loads((work / "unet_losses.json").read_text())
    assert curve == after["losses"][::10].tolist() and len(curve) == 2  # steps 0 and 10
    record = json.loads((tmp_path / "model" / "training.json").read_text())
    assert record["unet_loss_every_10_steps"] == [round(x, 5) for x in curve]


def test_from_config_same_seed_same_weights_and_the_global_rng_untouched(tokenizer):
    """from_config seeds a generator of its own: the weights of the old global seeding, and the caller's
    random state as it was."""
    from conftest import TEST
    from minisd.models.unet import UNet

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = StableDiffusion.from_config(TEST, tokenizer, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = StableDiffusion.from_config(TEST, tokenizer, seed=7)
    c = StableDiffusion.from_config(TEST, tokenizer, seed=8)
    for part in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, part).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)  # what from_config did before: the same U-Net, drawn first
        old = UNet(TEST.unet).state_dict()
    assert all(torch.equal(old[k], v) for k, v in a.unet.state_dict().items())
