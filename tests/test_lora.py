"""LoRA: the maths, attaching/fusing/unloading, every file format, and parity with diffusers (+PEFT)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import report
from safetensors.torch import save_file
from torch import nn

from minisd import StableDiffusion, WeightsError
from minisd.adapters import lora as L

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers loads LoRAs through PEFT

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def random_kohya(pipe: StableDiffusion, rank=4, alpha=2.0, seed=0, text_encoder=True, ldm_names=False) -> dict:
    """A kohya LoRA (lora_unet_… / lora_te_…, .alpha) with random non-zero A and B on every usual target."""
    g = torch.Generator().manual_seed(seed)
    roots = [("lora_unet_", pipe.unet, UNET_TARGETS)] + ([("lora_te_", pipe.text_encoder, TE_TARGETS)] if text_encoder else [])
    names = {}
    if ldm_names:
        from minisd.formats.weights import _rename, unet_prefix_table

        paths = [n for n, m in pipe.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        ldm = _rename({p + ".weight": None for p in paths}, unet_prefix_table(pipe.unet.config), "", reverse=True)
        names = {p: k.removesuffix(".weight") for k, p in zip(ldm, paths)}
    return kohya_weights(roots, names, rank, alpha, g)


def kohya_weights(roots, unet_names: dict, rank: int, alpha: float, g: torch.Generator) -> dict:
    """Random kohya LoRA tensors on every layer of each (key prefix, model, target suffixes) root; the U-Net's
    layers named by `unet_names` (module path -> the file's name) where it has them."""
    sd = {}
    for prefix, model, targets in roots:
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name.endswith(targets):
                w = m.weight
                key = prefix + (unet_names.get(name, name) if prefix == "lora_unet_" else name).replace(".", "_")
                sd[f"{key}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
                sd[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []),
                                                          generator=g) * 0.1
                sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = pipe.unet.config
    return (torch.randn(2, 4, c.sample_size, c.sample_size, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 77, c.cross_attention_dim, generator=g))


@pytest.fixture
def pipe(tiny_folder):
    p = StableDiffusion.from_pretrained(tiny_folder, device="cpu")
    p.progress = False
    return p


@pytest.fixture(scope="module")
def ref_pipe(tiny_folder):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None,
                                                           requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DDIMScheduler.from_pretrained(tiny_folder, subfolder="scheduler")
    yield ref


# ─── the maths ─────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("layer", [nn.Linear(12, 10), nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(6, 8, 1)],
                         ids=["linear", "conv3x3", "conv1x1"])
def test_lora_is_w_plus_alpha_over_r_BA(layer):
    torch.manual_seed(0)
    lora = L.LoRA(layer, rank=3, alpha=6.0)
    assert torch.all(lora.up.weight == 0)  # B = 0 ...
    x = torch.randn(2, 12) if isinstance(layer, nn.Linear) else torch.randn(2, 6, 5, 5)
    assert torch.all(lora(x) == 0)           # ... so a fresh LoRA adds nothing
    nn.init.normal_(lora.up.weight)
    merged = layer.weight + lora.delta_weight()  # W' = W + (α/r)·B A
    fn = nn.functional.linear if isinstance(layer, nn.Linear) else \
        (lambda x, w, b: nn.functional.conv2d(x, w, b, padding=layer.padding))
    torch.testing.assert_close(layer(x) + lora(x), fn(x, merged, layer.bias), rtol=1e-5, atol=1e-5)
    assert lora.scale == 2.0


def test_fresh_lora_changes_nothing_and_trains_only_its_own_weights(pipe):
    z, t, ctx = inputs(pipe)
    with torch.no_grad():
        before = pipe.unet(z, t, ctx)
    base = dict(pipe.unet.named_parameters())
    pipe.unet.requires_grad_(False)  # frozen first: the LoRAs attached after it are trainable
    loras = L.inject({"unet": pipe.unet}, "train", rank=4)
    assert len(loras) == 4 * 2 * 16  # q, k, v, out of attn1 and attn2 in the 16 transformer blocks of SD 1.5
    with torch.no_grad():
        assert torch.equal(pipe.unet(z, t, ctx), before)
    loss = pipe.unet(z, t, ctx).square().mean()
    loss.backward()
    assert all(lo.up.weight.grad is not None for lo in loras.values())
    assert all(p.grad is None for p in base.values())
    print(f"[lora] rank 4 on the attention projections: {L.parameter_count(loras):,} parameters, "
          f"{L.parameter_count(loras) / sum(p.numel() for p in base.values()):.1%} of the U-Net")


# ─── LoRAs in the module tree ──────────────────────────────────────────────────────────────────────

def test_loras_live_in_the_module_tree(pipe):
    """A LoRA swaps its layer for a LoRALinear holding the same Parameters; its A and B are in state_dict()
    and follow .to(dtype); the model's own keys stay as they were (state_dict_to_save)."""
    keys = list(pipe.unet.state_dict())
    q = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    loras = L.inject({"unet": pipe.unet}, "style", rank=4)
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert isinstance(layer, L.LoRALinear) and isinstance(layer, nn.Linear) and layer.weight is q.weight
    sd = pipe.unet.state_dict()
    added = [k for k in sd if k not in keys]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.loras.0.down.weight" in added
    assert len(added) == 2 * len(loras) and all(".loras.0." in k for k in added)
    L.fuse({"unet": pipe.unet}, loras)
    assert list(L.state_dict_to_save(pipe.unet)) == keys
    L.unfuse({"unet": pipe.unet}, loras)
    pipe.unet.to(torch.float16)
    assert all(lo.down.weight.dtype == lo.up.weight.dtype == torch.float16 for lo in loras.values())
    pipe.unet.to(torch.float32)
    L.inject({"unet": pipe.unet}, "more", rank=2, targets=["to_q"])  # a second LoRA on the same layers
    assert [lo.name for lo in layer.loras] == ["style", "more"]
    with pytest.raises(ValueError, match="'style' is already attached"):
        L.inject({"unet": pipe.unet}, "style", rank=2)


def test_unload_restores_the_model_exactly(pipe):
    before = dict(pipe.unet.named_parameters())
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    types = {n: type(m) for n, m in pipe.unet.named_modules()}
    pipe.load_lora(random_kohya(pipe, seed=6), name="a", scale=0.7)
    pipe.load_lora(random_kohya(pipe, seed=7), name="b")
    pipe.fuse_lora()
    pipe.unload_lora()
    after = pipe.unet.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert all(p is before[n] for n, p in pipe.unet.named_parameters())  # the very same Parameters
    assert {n: type(m) for n, m in pipe.unet.named_modules()} == types  # plain nn.Linear / nn.Conv2d again
    assert not any(isinstance(m, (L.LoRALinear, L.LoRAConv2d)) for m in pipe.text_encoder.modules())


def test_fusing_one_lora_by_name(pipe):
    """fuse_lora(name) folds that LoRA alone; set_lora_scale refolds it; unfuse_lora(name) is exact."""
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    z, t, ctx = inputs(pipe)
    pipe.load_lora(random_kohya(pipe, seed=9), name="a", scale=0.6)
    pipe.load_lora(random_kohya(pipe, seed=10), name="b")
    with torch.no_grad():
        on_the_fly = pipe.unet(z, t, ctx)
    pipe.fuse_lora("a")
    assert all(lo.fused for lo in pipe.loras["a"].values()) and not any(lo.fused for lo in pipe.loras["b"].values())
    with torch.no_grad():
        fused = pipe.unet(z, t, ctx)
    pipe.set_lora_scale("a", 0.0)
    assert all(lo.fused for lo in pipe.loras["a"].values())
    pipe.unfuse_lora("a")
    pipe.set_lora_scale("a", 0.6)
    print(f"one LoRA fused against both on the fly: max |diff| {(fused - on_the_fly).abs().max():.1e}")
    assert torch.allclose(fused, on_the_fly, atol=1e-5)
    with pytest.raises(KeyError, match="no LoRA named 'c'"):
        pipe.fuse_lora("c")
    pipe.unload_lora()
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in state.items())


def test_saving_a_pipeline_with_loras(pipe, tmp_path):
    """Fused LoRAs are saved inside the weights (same keys as the base model); unfused ones are refused."""
    from minisd.pipeline import save_single_file

    pipe.load_lora(random_kohya(pipe, seed=8), name="style")
    with pytest.raises(RuntimeError, match=r"LoRAs \['style'\] are applied on the fly.*fuse_lora"):
        pipe.save_pretrained(tmp_path / "unfused")
    with pytest.raises(RuntimeError, match="applied on the fly"):
        save_single_file(pipe, tmp_path / "unfused.safetensors")
    z, t, ctx = inputs(pipe)
    pipe.fuse_lora()
    with torch.no_grad():
        want = pipe.unet(z, t, ctx)
    pipe.save_pretrained(tmp_path / "fused")
    save_single_file(pipe, tmp_path / "fused.safetensors")
    for source in (tmp_path / "fused", tmp_path / "fused.safetensors"):
        saved = StableDiffusion.from_pretrained(source, device="cpu", tokenizer=pipe.tokenizer)
        assert not any(".loras." in k for k in saved.unet.state_dict())
        fused = pipe.unet.state_dict()
        assert all(torch.equal(v, fused[k]) for k, v in saved.unet.state_dict().items())  # the fused weights, exactly
        with torch.no_grad():  # (the same weights may take another conv kernel with another memory layout)
            assert torch.allclose(saved.unet(z, t, ctx), want, rtol=0, atol=1e-6)


def test_lora_scale_must_be_finite(pipe):
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=f"LoRA scale must be a finite number, got {bad}"):
            pipe.load_lora(random_kohya(pipe), scale=bad)
    assert not pipe.loras
    pipe.load_lora(random_kohya(pipe), name="a")
    with pytest.raises(ValueError, match="got nan"):
        pipe.set_lora_scale("a", float("nan"))
    assert all(lo.multiplier == 1.0 for lo in pipe.loras["a"].values())


def test_a_unet_with_a_lora_compiles(pipe):
    """torch.compile traces a U-Net carrying a LoRA as one graph (fullgraph=True fails on any graph break)
    and gives the eager numbers. The "eager" backend runs what Dynamo captured without generating kernels:
    Inductor also passes, but takes minutes on a CPU."""
    z, t, ctx = inputs(pipe)
    pipe.load_lora(random_kohya(pipe, seed=9, text_encoder=False), name="a", scale=0.8)
    with torch.no_grad():
        eager = pipe.unet(z, t, ctx)
        compiled = torch.compile(pipe.unet, backend="eager", fullgraph=True)(z, t, ctx)
    report("U-Net with a LoRA, compiled (Dynamo, fullgraph) vs eager", compiled, eager, 1e-6)


# ─── parity with diffusers ─────────────────────────────────────────────────────────────────────────

def compare(pipe, ref, name, scale=1.0):
    z, t, ctx = inputs(pipe)
    with torch.no_grad():
        report(f"{name}: U-Net", pipe.unet(z, t, ctx), ref.unet(z, t, ctx).sample, 1e-4)
        ids = pipe.tokenizer(["a red circle on the left"])
        report(f"{name}: text encoder", pipe.text_encoder(ids), ref.text_encoder(ids)[0], 1e-4)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    common = dict(num_inference_steps=8, guidance_scale=7.5, latents=latents, output_type="pt")
    report(f"{name}: pipeline images", pipe("a red circle on the left", **common),
           ref("a red circle on the left", **common).images, 1e-3)


def test_kohya_file_matches_diffusers(pipe, ref_pipe, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file(random_kohya(pipe), path, metadata={"ss_network_module": "networks.lora"})
    name = pipe.load_lora(path)
    ref_pipe.load_lora_weights(path, adapter_name="kohya")
    try:
        compare(pipe, ref_pipe, "kohya LoRA, α/r = 0.5")
        pipe.set_lora_scale(name, 0.6)
        ref_pipe.set_adapters(["kohya"], [0.6])
        compare(pipe, ref_pipe, "kohya LoRA at scale 0.6")
    finally:
        ref_pipe.unload_lora_weights()


def test_peft_file_written_by_minisd_loads_in_diffusers(pipe, ref_pipe, tmp_path):
    pipe.load_lora(random_kohya(pipe, rank=4, alpha=8.0, seed=1), name="k")
    out = L.save_lora(pipe.loras["k"], tmp_path / "peft")  # diffusers' file name, α in the PEFT metadata
    assert out.name == "pytorch_lora_weights.safetensors"
    meta = json.loads(L.read_metadata(out)["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 8.0 and meta["unet.r"] == 4
    ref_pipe.load_lora_weights(tmp_path / "peft")
    try:
        compare(pipe, ref_pipe, "PEFT LoRA (α = 2r, from metadata)")
    finally:
        ref_pipe.unload_lora_weights()


# ─── formats read by minisd give the same layers ───────────────────────────────────────────────────

def test_every_format_gives_the_same_model(pipe, tmp_path):
    kohya = random_kohya(pipe, rank=4, alpha=4.0, seed=2)  # α = r: the older formats have no α
    z, t, ctx = inputs(pipe)
    pipe.load_lora(kohya, name="kohya")
    with torch.no_grad():
        want = pipe.unet(z, t, ctx)
    base = pipe.loras["kohya"]
    peft, _ = L.lora_state_dict(base, "peft")
    old_procs = {}      # unet.save_attn_procs, early 2023: no prefix, ….processor.to_q_lora.down.weight
    post_peft = {}      # train_text_to_image_lora.py: unet.….to_q.lora.down.weight
    for path, lo in base.items():
        root, _, rest = path.partition(".")
        post_peft[f"{path}.lora.down.weight"] = lo.down.weight
        post_peft[f"{path}.lora.up.weight"] = lo.up.weight
        if root == "unet" and rest.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or rest.endswith("to_out.0"):
            attn, proj = rest.removesuffix(".0").rsplit(".", 1)
            old_procs[f"{attn}.processor.{proj}_lora.down.weight"] = lo.down.weight
            old_procs[f"{attn}.processor.{proj}_lora.up.weight"] = lo.up.weight
    pipe.unload_lora()
    for name, sd in [("peft", peft), ("post-peft diffusers", post_peft),
                     ("LDM-named kohya", random_kohya(pipe, rank=4, alpha=4.0, seed=2, ldm_names=True))]:
        pipe.load_lora(sd, name=name)
        with torch.no_grad():
            report(f"LoRA read from the {name} layout vs kohya", pipe.unet(z, t, ctx), want, 1e-6)
        pipe.unload_lora()
    only_attention = {k: v for k, v in kohya.items() if "_attn" in k and "lora_unet" in k}
    pipe.load_lora(only_attention, name="attn")
    with torch.no_grad():
        want = pipe.unet(z, t, ctx)
    pipe.unload_lora()
    pipe.load_lora(old_procs, name="procs")
    with torch.no_grad():
        report("LoRA read from diffusers attention processors vs kohya", pipe.unet(z, t, ctx), want, 1e-6)


def test_kohya_round_trip_and_folder(pipe, tmp_path):
    pipe.load_lora(random_kohya(pipe, seed=3), name="a")
    path = L.save_lora(pipe.loras["a"], tmp_path / "a_kohya.safetensors", format="kohya")
    sd = L.read_state_dict(path)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.") for k in sd)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in sd)
    z, t, ctx = inputs(pipe)
    with torch.no_grad():
        want = pipe.unet(z, t, ctx)
    pipe.unload_lora()
    assert pipe.load_lora(path) == "a_kohya"
    with torch.no_grad():
        assert torch.equal(pipe.unet(z, t, ctx), want)


# ─── several LoRAs, scales, fuse / unfuse / unload ─────────────────────────────────────────────────

def test_scales_fuse_unfuse_unload(pipe):
    z, t, ctx = inputs(pipe)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with torch.no_grad():
        base = pipe.unet(z, t, ctx)
    a, b = random_kohya(pipe, seed=4), random_kohya(pipe, seed=5)
    pipe.load_lora(a, scale=0.5, name="a")
    with torch.no_grad():
        only_a = pipe.unet(z, t, ctx)
    pipe.load_lora(b, scale=1.0, name="b")
    with torch.no_grad():
        both = pipe.unet(z, t, ctx)
        pipe.set_lora_scale("a", 0.0)
        only_b = pipe.unet(z, t, ctx)
        pipe.set_lora_scale("a", 0.5)
        assert not torch.allclose(both, only_a) and not torch.allclose(both, only_b)
        pipe.fuse_lora()
        report("fused equals unfused", pipe.unet(z, t, ctx), both, 1e-5)
        pipe.set_lora_scale("b", 0.0)  # changing a scale while fused re-fuses
        report("fused, scale changed", pipe.unet(z, t, ctx), only_a, 1e-5)
        pipe.set_lora_scale("b", 1.0)
        pipe.unfuse_lora()
        assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in original.items())  # exact
        report("unfused again", pipe.unet(z, t, ctx), both, 1e-6)
        pipe.unload_lora("a")
        report("a unloaded", pipe.unet(z, t, ctx), only_b, 1e-5)
        pipe.unload_lora()
        assert torch.equal(pipe.unet(z, t, ctx), base)
    assert not pipe.loras and not any(isinstance(m, (L.LoRALinear, L.LoRAConv2d)) for m in pipe.unet.modules())
    with pytest.raises(KeyError, match="no LoRA named 'x'"):
        pipe.set_lora_scale("x", 1.0)


# ─── bad files ─────────────────────────────────────────────────────────────────────────────────────

def test_bad_lora_files_get_clear_errors(pipe, tmp_path):
    with pytest.raises(WeightsError, match="LoHa"):
        pipe.load_lora({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)})
    with pytest.raises(WeightsError, match="LoKr"):
        pipe.load_lora({"lora_unet_mid_block_attentions_0_proj_in.lokr_w1": torch.zeros(4, 4)})
    with pytest.raises(WeightsError, match="SDXL"):
        pipe.load_lora({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 4)})
    with pytest.raises(WeightsError, match=r"1 keys could not be placed.*lora_unet_nowhere_to_q"):
        pipe.load_lora({"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(4, 32),
                        **{k: v for k, v in random_kohya(pipe).items() if "attn1_to_q" in k}})
    sd = random_kohya(pipe, text_encoder=False)
    key = next(k for k in sd if k.endswith("attn2_to_k.lora_down.weight"))
    sd[key] = torch.zeros(4, 99)
    with pytest.raises(WeightsError, match=r"shape mismatches.*attn2\.to_k.*\(4, 99\)"):
        pipe.load_lora(sd)
    with pytest.raises(WeightsError, match="no pytorch_lora_weights"):
        pipe.load_lora(tmp_path)
    with pytest.raises(FileNotFoundError):
        pipe.load_lora(tmp_path / "missing.safetensors")
    assert not pipe.loras  # nothing half-loaded
