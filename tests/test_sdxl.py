"""SDXL's networks equal diffusers' / transformers' (fp32, CPU), and its weights files convert exactly.

Two sizes: the exact SDXL base and refiner, built on the meta device (every parameter name and shape,
no memory), and SMALL, the same topology at toy widths (numerical parity; two real SDXL U-Nets would
not fit in memory). The single-file key list is checked against diffusers' own SDXL converter.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import report

from minisd import (
    AutoencoderKL,
    SchedulerConfig,
    TextEncoder,
    TextEncoderConfig,
    UNet,
    VAEConfig,
)
from minisd.formats.sdxl import (
    SDXLComponents,
    convert_sdxl_single_file,
    fix_projection_text_keys,
    read_sdxl_folder,
    to_sdxl_single_file,
)
from minisd.formats.weights import load_strict
from minisd.models.configs import SDXL_BASE, SDXL_REFINER, SDXLConfig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

# SDXL's topology at toy widths: no attention at level 0, transformer depth 1, 2, 2, Linear proj_in/out,
# two text encoders (E = 32 + 32), a pooled width P = 24 ≠ E (so a transposed text_projection shows), 6 ids × 8
_CLIP = TextEncoderConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, projection_dim=32)
SMALL = SDXLConfig(
    unet=replace(SDXL_BASE.unet, block_out_channels=(32, 64, 64), num_heads=(2, 4, 4), transformer_depth=(1, 2, 2),
                 cross_attention_dim=64, norm_num_groups=8, sample_size=8, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=24 + 6 * 8),
    vae=VAEConfig(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64, scaling_factor=0.13025),
    text_encoder=_CLIP,
    text_encoder_2=replace(_CLIP, hidden_act="gelu", projection_dim=24, with_projection=True),
    scheduler=SchedulerConfig(timestep_spacing="leading"),
)
SMALL_REFINER = replace(SMALL, text_encoder=None, unet=replace(
    SMALL.unet, block_out_channels=(32, 64, 64, 64), cross_attention=(False, True, True, False), num_heads=(2, 4, 4, 4),
    transformer_depth=2, cross_attention_dim=32, projection_class_embeddings_input_dim=24 + 5 * 8))


def reference_unet(cfg):
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**cfg.to_diffusers()).eval()


def reference_text_encoder(cfg):
    torch.manual_seed(0)
    skip = ("architectures", "model_type", "torch_dtype")
    config = transformers.CLIPTextConfig(**{k: v for k, v in cfg.to_transformers().items() if k not in skip})
    cls = transformers.CLIPTextModelWithProjection if cfg.with_projection else transformers.CLIPTextModel
    return cls(config).eval()


def ours(cls, cfg, state_dict):
    with torch.device("meta"):
        model = cls(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)  # strict: every name matches, no key map
    return model.eval()


def shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_unet(cfg: SDXLConfig, name: str):
    ref = reference_unet(cfg.unet)
    model = ours(UNet, cfg.unet, ref.state_dict())
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, cfg.unet.cross_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.text_encoder_2.projection_dim, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024, 6.0][:cfg.time_ids_count]] * 2)
    t = torch.tensor([999, 1])
    with torch.no_grad():
        expected = ref(z, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        report(name, model(z, t, context, pooled=pooled, time_ids=time_ids), expected, rtol=1e-4)


# ─── the U-Net ──────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("cfg", [SDXL_BASE, SDXL_REFINER], ids=["base", "refiner"])
def test_unet_names_and_shapes_full_size(cfg):
    """The exact SDXL U-Net (2.6B parameters base, 2.3B refiner) has diffusers' every name and shape."""
    with torch.device("meta"):
        ref, model = diffusers.UNet2DConditionModel(**cfg.unet.to_diffusers()), UNet(cfg.unet)
    assert shapes(model) == shapes(ref)


def test_unet_parity_small():
    check_unet(SMALL, "sdxl unet (small: depth 1,2,2, linear proj, text_time)")


def test_unet_parity_small_refiner():
    check_unet(SMALL_REFINER, "sdxl refiner unet (small: 4 levels, depth 2, 5 time ids)")


def test_unet_config_round_trips_through_diffusers():
    for cfg in (SDXL_BASE.unet, SDXL_REFINER.unet):
        assert type(cfg).from_diffusers(json.loads(json.dumps(cfg.to_diffusers()))) == cfg


def test_unet_added_conditions_are_checked():
    with torch.device("meta"):
        model = UNet(SMALL.unet)
    z, context = torch.zeros(1, 4, 8, 8, device="meta"), torch.zeros(1, 77, 64, device="meta")
    with pytest.raises(ValueError, match="needs pooled"):
        model(z, 1, context)
    with pytest.raises(ValueError, match="expects 72"):
        model(z, 1, context, pooled=torch.zeros(1, 24, device="meta"), time_ids=torch.zeros(1, 5, device="meta"))
    with pytest.raises(ValueError, match="transformer_depth"):
        replace(SMALL.unet, transformer_depth=(1, 2))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        replace(SMALL, text_encoder=None)


# ─── the text encoders ─────────────────────────────────────────────────────────────────────────────

def check_text_encoder(cfg: TextEncoderConfig, name: str):
    ref = reference_text_encoder(cfg)
    model = ours(TextEncoder, cfg, fix_projection_text_keys(ref.state_dict()))
    ids = torch.randint(0, cfg.vocab_size - 2, (2, 77), generator=torch.Generator().manual_seed(3))
    ids[:, 0], ids[:, 9:] = cfg.vocab_size - 2, cfg.vocab_size - 1  # BOS, tokens, EOS padding
    ids[1, 12:] = 0  # tokenizer_2 pads with "!" (id 0) after the EOS, not with EOS
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        hidden, pooled = model.hidden_and_pooled(ids)
        report(f"{name} last hidden state", model(ids), out.last_hidden_state, rtol=1e-4)
        report(f"{name} penultimate layer", hidden, out.hidden_states[-2], rtol=1e-4)
        expected = out.text_embeds if cfg.with_projection else out.pooler_output
        report(f"{name} pooled{' projected' if cfg.with_projection else ''}", pooled, expected, rtol=1e-4)


def test_text_encoders_parity_small():
    check_text_encoder(SMALL.text_encoder, "clip ViT-L layout (small)")
    check_text_encoder(SMALL.text_encoder_2, "openclip bigG layout with projection (small, gelu)")


def test_text_encoders_names_and_shapes_full_size():
    """CLIP ViT-L (123M) and OpenCLIP bigG with projection (695M) have transformers' names and shapes."""
    for cfg in (SDXL_BASE.text_encoder, SDXL_BASE.text_encoder_2):
        with torch.device("meta"):
            ref, model = reference_text_encoder(cfg), TextEncoder(cfg)
        assert shapes(model) == {k: tuple(v.shape) for k, v in fix_projection_text_keys(ref.state_dict()).items()}


# ─── the single file ────────────────────────────────────────────────────────────────────────────────

def components(cfg: SDXLConfig, device: str = "cpu") -> SDXLComponents:
    """minisd's four networks of `cfg` (random weights; on "meta": names and shapes only)."""
    torch.manual_seed(0)
    with torch.device(device):
        nets = {"unet": UNet(cfg.unet), "vae": AutoencoderKL(cfg.vae), "text_encoder_2": TextEncoder(cfg.text_encoder_2),
                "text_encoder": TextEncoder(cfg.text_encoder) if cfg.text_encoder else None}
    pair = lambda name: (nets[name].config, nets[name].state_dict()) if nets[name] else None
    return SDXLComponents(unet=pair("unet"), vae=pair("vae"), text_encoder=pair("text_encoder"),
                          text_encoder_2=pair("text_encoder_2"), scheduler=cfg.scheduler)


def key_shapes(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def diffusers_conversion(ckpt, cfg: SDXLConfig, device: str = "cpu") -> dict:
    """diffusers' own single-file conversion (what `from_single_file` runs) of each network, and its models."""
    torch.manual_seed(0)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**cfg.unet.to_diffusers())
        vae = diffusers.AutoencoderKL(**cfg.vae.to_diffusers())
        te2 = reference_text_encoder(cfg.text_encoder_2)
    bigg_prefix = f"conditioner.embedders.{0 if cfg.text_encoder is None else 1}.model."
    out = {"unet": (unet, single_file_utils.convert_ldm_unet_checkpoint(ckpt, dict(unet.config))),
           "vae": (vae, single_file_utils.convert_ldm_vae_checkpoint(ckpt, dict(vae.config))),
           "text_encoder_2": (te2, single_file_utils.convert_open_clip_checkpoint(te2, ckpt, prefix=bigg_prefix))}
    if cfg.text_encoder is not None:
        with torch.device(device):
            te = reference_text_encoder(cfg.text_encoder)
        out["text_encoder"] = (te, single_file_utils.convert_ldm_clip_checkpoint(ckpt))
    return out


@pytest.mark.parametrize("cfg", [SDXL_BASE, SDXL_REFINER], ids=["base", "refiner"])
def test_single_file_keys_full_size(cfg):
    """The full key list of the real SDXL single file (built on meta tensors), checked against diffusers'
    converter: it recognises the file, and maps every U-Net and VAE key one to one onto its models'
    names and shapes; minisd reads the same file back to its own names, every key placed."""
    ours = components(cfg, "meta")
    ckpt = to_sdxl_single_file(ours)
    kind = "xl_base" if cfg is SDXL_BASE else "xl_refiner"
    assert single_file_utils.infer_diffusers_model_type(ckpt) == kind
    for name, (ref, converted) in diffusers_conversion(ckpt, cfg, "meta").items():
        if "text" in name:  # transformers ≥ 5.6 names CLIPTextModel's tensors without `text_model.`
            converted, ref = fix_projection_text_keys(converted), fix_projection_text_keys(ref.state_dict())
        assert key_shapes(converted) == key_shapes(ref if isinstance(ref, dict) else ref.state_dict()), name
    n_unet = sum(k.startswith("model.diffusion_model.") for k in ckpt)
    assert n_unet == len(ours.unet[1]) == len(diffusers_conversion(ckpt, cfg, "meta")["unet"][1])
    extras = {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77),
              f"conditioner.embedders.{1 if cfg.text_encoder else 0}.model.logit_scale": torch.zeros(()),
              "alphas_cumprod": torch.zeros(1000)}  # what real files carry beside the weights
    back = convert_sdxl_single_file(ckpt | extras, f"sd_xl_{kind[3:]}.safetensors")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(ours, name), getattr(back, name)
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert theirs[0] == mine[0] and key_shapes(theirs[1]) == key_shapes(mine[1]), name
    print(f"[sdxl] {kind} single file: {len(ckpt)} tensors, {n_unet} U-Net")


def test_single_file_round_trip_small():
    """minisd -> single file -> minisd is exact; single file -> diffusers' converter -> diffusers' models
    computes what minisd computes."""
    ours = components(SMALL)
    ckpt = to_sdxl_single_file(ours)
    back = convert_sdxl_single_file(ckpt, "small.safetensors", SMALL)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(ours, name), getattr(back, name)
        assert mine[1].keys() == theirs[1].keys() and all(torch.equal(v, theirs[1][k]) for k, v in mine[1].items())
    refs = diffusers_conversion(ckpt, SMALL)
    for ref, converted in refs.values():
        ref.load_state_dict(reference_names(ref, converted), strict=True)
    unet = ours_module(UNet, ours.unet)
    g = torch.Generator().manual_seed(4)
    z, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    pooled, time_ids = torch.randn(1, 24, generator=g), torch.tensor([[512.0, 512, 0, 0, 512, 512]])
    ids = torch.randint(0, 998, (1, 77), generator=g)
    ids[0, 0], ids[0, 7:] = 998, 999
    with torch.no_grad():
        added = {"text_embeds": pooled, "time_ids": time_ids}
        report("sdxl unet via single file", unet(z, 500, context, pooled=pooled, time_ids=time_ids),
               refs["unet"][0](z, 500, context, added_cond_kwargs=added).sample, rtol=1e-4)
        report("sdxl vae via single file", ours_module(AutoencoderKL, ours.vae).decode(z),
               refs["vae"][0].decode(z).sample, rtol=1e-4)
        report("bigG pooled via single file", ours_module(TextEncoder, ours.text_encoder_2).hidden_and_pooled(ids)[1],
               refs["text_encoder_2"][0](ids).text_embeds, rtol=1e-4)


def reference_names(ref, sd):
    """`sd` spelled as `ref` names its tensors (with or without transformers' `text_model.` prefix)."""
    if any(k.startswith("text_model.") for k in ref.state_dict()) or not any(k.startswith("text_model.") for k in sd):
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def ours_module(cls, pair):
    return ours(cls, pair[0], dict(pair[1]))


def test_single_file_errors_name_the_problem():
    ckpt = to_sdxl_single_file(components(SMALL, "meta"))
    from minisd.formats.weights import WeightsError

    with pytest.raises(WeightsError, match="belong to no SDXL network: cond_stage_model"):
        convert_sdxl_single_file(ckpt | {"cond_stage_model.x": torch.zeros(1)}, "f.safetensors", SMALL)
    with pytest.raises(WeightsError, match="no place: transformer.resblocks.0.attn.bogus"):
        convert_sdxl_single_file(ckpt | {"conditioner.embedders.1.model.transformer.resblocks.0.attn.bogus":
                                         torch.zeros(1)}, "f.safetensors", SMALL)
    with pytest.raises(WeightsError, match="no CLIP ViT-L"):
        convert_sdxl_single_file({k: v for k, v in ckpt.items() if ".0.transformer." not in k}, "f", SMALL)


# ─── diffusers folders ─────────────────────────────────────────────────────────────────────────────

def test_diffusers_folder_small(tmp_path):
    """A folder written by diffusers and transformers (`save_pretrained`) reads into minisd's configs and
    names, and the U-Net and both encoders compute what the writers' models compute."""
    refs = diffusers_conversion(to_sdxl_single_file(components(SMALL)), SMALL)
    for name, (ref, converted) in refs.items():
        ref.load_state_dict(reference_names(ref, converted), strict=True)
        ref.save_pretrained(tmp_path / name)
    diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     steps_offset=1, timestep_spacing="leading").save_pretrained(tmp_path / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline", **{n: ["x", "y"] for n in refs}}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    c = read_sdxl_folder(tmp_path)
    assert (c.unet[0], c.vae[0], c.text_encoder[0], c.text_encoder_2[0]) == \
        (SMALL.unet, SMALL.vae, SMALL.text_encoder, SMALL.text_encoder_2)
    modules = {}
    for name, cls in (("unet", UNet), ("text_encoder", TextEncoder), ("text_encoder_2", TextEncoder)):
        with torch.device("meta"):
            module = cls(getattr(c, name)[0])
        modules[name] = load_strict(module, getattr(c, name)[1], c.sources[name]).eval()
    ids = torch.randint(0, 998, (1, 77), generator=torch.Generator().manual_seed(5))
    ids[0, 0], ids[0, 5:] = 998, 999
    with torch.no_grad():
        h1, _ = modules["text_encoder"].hidden_and_pooled(ids)
        h2, pooled = modules["text_encoder_2"].hidden_and_pooled(ids)
        out1 = refs["text_encoder"][0](ids, output_hidden_states=True)
        out2 = refs["text_encoder_2"][0](ids, output_hidden_states=True)
        context = torch.cat([h1, h2], dim=-1)  # (1, 77, 32 + 32): SDXL's two encoders side by side
        report("sdxl context from folder", context,
               torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1), rtol=1e-4)
        report("sdxl pooled from folder", pooled, out2.text_embeds, rtol=1e-4)
        z, time_ids = torch.randn(1, 4, 8, 8), torch.tensor([[512.0, 512, 0, 0, 512, 512]])
        report("sdxl unet from folder", modules["unet"](z, 10, context, pooled=pooled, time_ids=time_ids),
               refs["unet"][0](z, 10, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample,
               rtol=1e-4)
