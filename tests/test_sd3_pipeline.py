"""The SD 3 pipeline equals diffusers' StableDiffusion3Pipeline: the same random weights (SD 3's topology at toy
widths: a 2-block MMDiT of width 64, CLIP-L and bigG with projections, a 2-layer T5, a 16-channel VAE with a
shift and no quant convs), prompts, latents and steps give the same prompt embeddings, latents and images
(fp32 CPU, relative max difference <= 1e-5 for the embeddings, 1e-4 after sampling). diffusers reads minisd's
save_pretrained folders, and diffusers' own single-file converter reads minisd's single files, so both layouts
are checked on the way. Then the tiny variant (one CLIP encoder, the shapes world's) and bad input."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import WORDS, report
from test_mmdit import build_unigram_tokenizer

from minisd import SchedulerConfig, StableDiffusion, StableDiffusion3, TextEncoderConfig, VAEConfig, WeightsError
from minisd.families import family_of_folder, family_of_state_dict
from minisd.formats.sd3 import SD3Config, infer_mmdit_config, mmdit_to_single_file, to_sd3_single_file
from minisd.formats.weights import read_state_dict
from minisd.models.mmdit import MMDiT, MMDiTConfig
from minisd.models.sd3_configs import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, TINY_T5
from minisd.models.tokenizer import Tokenizer, build_word_tokenizer
from minisd.models.tokenizer_t5 import T5Tokenizer
from minisd.pipeline_sd3 import save_single_file

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

PROMPTS = ["a red circle on the left", "a large blue square at the top"]
SIZE = 64  # pixels: 8×8 latents, 4×4 patches

# CLIP-L 32 wide (P 32) + bigG 40 wide (P 24 ≠ E, so a transposed projection shows): 72 channels, zero-padded
# to T5's 80; pooled 32 + 24 = 56. A shift of 0.25 (SD 3's is 0.0609) so that a forgotten shift shows.
_CLIP = TextEncoderConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, projection_dim=32, with_projection=True)
SMALL = SD3Config(
    transformer=MMDiTConfig(sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=32,
                            joint_attention_dim=80, caption_projection_dim=64, pooled_projection_dim=56,
                            pos_embed_max_size=16),
    vae=VAEConfig(latent_channels=16, block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64,
                  scaling_factor=1.5305, shift_factor=0.25, use_quant_conv=False, use_post_quant_conv=False),
    text_encoder=_CLIP,
    text_encoder_2=replace(_CLIP, hidden_size=40, hidden_act="gelu", projection_dim=24),
    text_encoder_3=replace(TINY_T5, d_model=80),
    scheduler=SchedulerConfig(prediction_type="flow", shift=3.0),
)
NO_T5 = replace(SMALL, text_encoder_3=None)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """CLIP's tokenizer pads with EOS, bigG's with "!", as in SD 3's repos; T5's is a unigram tokenizer.json."""
    tok = build_word_tokenizer(list(WORDS), tmp_path_factory.mktemp("tokenizer"))
    folder = tmp_path_factory.mktemp("tokenizer_2")
    build_word_tokenizer(list(WORDS), folder)
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    t5_folder = tmp_path_factory.mktemp("tokenizer_3")
    build_unigram_tokenizer(t5_folder)
    return tok, Tokenizer(folder), T5Tokenizer(t5_folder)


def folder_pair(cfg, tokenizers, tmp_path_factory, name, seed):
    """(minisd pipeline, its save_pretrained folder)."""
    pipe = StableDiffusion3.from_config(cfg, *tokenizers, seed=seed)
    pipe.progress = False
    folder = tmp_path_factory.mktemp(name)
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def full(tokenizers, tmp_path_factory):
    return folder_pair(SMALL, tokenizers, tmp_path_factory, "sd3", seed=0)


@pytest.fixture(scope="module")
def no_t5(tokenizers, tmp_path_factory):
    return folder_pair(NO_T5, tokenizers, tmp_path_factory, "sd3_no_t5", seed=1)


def reference(folder):
    """diffusers' pipeline on the folder (a folder without T5 lists it as [null, null]: diffusers wants it named)."""
    index = json.loads((folder / "model_index.json").read_text())
    absent = {k: None for k in ("text_encoder_3", "tokenizer_3") if index[k] == [None, None]}
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ─── parity with diffusers ─────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("pair", ["full", "no_t5"])
def test_prompt_embeddings_match_diffusers(pair, request):
    """CLIP-L ‖ bigG penultimate states padded to the T5 width, then T5's 256 tokens (zeros without T5);
    pooled = both projected EOS vectors; two prompts × two pictures, negative prompts."""
    ours, folder = request.getfixturevalue(pair)
    ref = reference(folder)
    assert (ref.text_encoder_3 is None) == (pair == "no_t5")
    expected = ref.encode_prompt(PROMPTS, None, None, num_images_per_prompt=2, negative_prompt=["green", "cat"])
    cond, uncond = ours.encode_prompt(PROMPTS, ["green", "cat"], num_images_per_prompt=2)
    assert cond[0].shape == (4, 77 + 256, 80) and cond[1].shape == (4, 56)
    for name, mine, theirs in zip(("context", "negative context", "pooled", "negative pooled"),
                                  (cond[0], uncond[0], cond[1], uncond[1]), expected):
        report(f"sd3 ({pair}) {name}", mine, theirs, 1e-5)
    if pair == "no_t5":
        assert cond[0][:, 77:].abs().max() == 0
    assert cond[0][:, :77, 72:].abs().max() == 0  # CLIP's 72 channels zero-padded to 80


@pytest.mark.parametrize("pair", ["full", "no_t5"])
def test_txt2img_matches_diffusers(pair, request):
    """CFG 7 with the empty negative prompt, 3 flow-Euler steps (shift 3), fixed latents: the final latents
    and the pictures (decoded from z / scaling_factor + shift_factor)."""
    ours, folder = request.getfixturevalue(pair)
    ref = reference(folder)
    common = dict(num_inference_steps=3, guidance_scale=7.0, height=SIZE, width=SIZE, latents=noise((2, 16, 8, 8)))
    expected = ref(PROMPTS, output_type="latent", **common).images
    report(f"sd3 ({pair}) final latents", ours(PROMPTS, output_type="latent", **common), expected, 1e-4)
    expected = ref(PROMPTS, output_type="pt", **common).images
    report(f"sd3 ({pair}) images", ours(PROMPTS, output_type="pt", **common), expected, 1e-4)


def test_cfg_with_negative_prompt_matches_diffusers(full):
    """Negative prompts replace "" in the unconditional branch; 2 pictures per prompt from a seeded generator
    (the noise drawn as diffusers draws it); 4 steps at CFG 4.5."""
    ours, folder = full
    ref = reference(folder)
    common = dict(num_inference_steps=4, guidance_scale=4.5, height=SIZE, width=SIZE, num_images_per_prompt=2,
                  negative_prompt=["green", "black background"], output_type="pt")
    expected = ref(PROMPTS, generator=torch.Generator().manual_seed(7), **common).images
    mine = ours(PROMPTS, generator=torch.Generator().manual_seed(7), **common)
    report("sd3 images (CFG 4.5, negative prompts, 2 per prompt)", mine, expected, 1e-4)
    unguided = ours(PROMPTS, generator=torch.Generator().manual_seed(7), **(common | dict(guidance_scale=1.0)))
    report("sd3 images without guidance (one pass per step)",
           unguided, ref(PROMPTS, generator=torch.Generator().manual_seed(7),
                         **(common | dict(guidance_scale=1.0))).images, 1e-4)


# ─── folders and single files ──────────────────────────────────────────────────────────────────────

def same_config(a, b) -> None:
    """Equal configs; of the scheduler, what a flow schedule reads (its file has no betas)."""
    flow = lambda s: (s.prediction_type, s.shift, s.num_train_timesteps)  # noqa: E731
    assert replace(a.config, scheduler=b.scheduler) == b.config and flow(a.scheduler) == flow(b.scheduler)


def same_networks(a, b) -> None:
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        mine, back = getattr(a, name), getattr(b, name)
        assert (mine is None) == (back is None), name
        if mine is not None:
            mine, back = mine.state_dict(), back.state_dict()
            assert mine.keys() == back.keys() and all(torch.equal(v, back[k]) for k, v in mine.items()), name


@pytest.mark.parametrize("pair", ["full", "no_t5"])
def test_folder_round_trip(pair, request):
    ours, folder = request.getfixturevalue(pair)
    assert family_of_folder(folder).name == "sd3"
    back = StableDiffusion.from_pretrained(folder, device="cpu")
    assert isinstance(back, StableDiffusion3)
    same_config(ours, back)
    same_networks(ours, back)
    back.progress = False
    args = dict(num_inference_steps=2, height=SIZE, width=SIZE, seed=3, output_type="pt")
    report(f"sd3 ({pair}) save_pretrained -> from_pretrained images", back(PROMPTS[0], **args),
           ours(PROMPTS[0], **args), 1e-5)  # the same weights; another memory alignment can round differently


@pytest.mark.parametrize("pair", ["full", "no_t5"])
def test_single_file_round_trip(pair, request, tmp_path):
    """Stability's layout: every tensor comes back equal; the file is recognised by its keys; diffusers' own
    converter turns its MMDiT part into our transformer's state dict, tensor for tensor."""
    ours, folder = request.getfixturevalue(pair)
    path = tmp_path / "small_sd3.safetensors"
    save_single_file(ours, path)
    sd = read_state_dict(path)
    assert family_of_state_dict(sd).name == "sd3"
    assert any(k.startswith("text_encoders.clip_g.transformer.") for k in sd)
    assert any(k.startswith("text_encoders.t5xxl.transformer.") for k in sd) == (pair == "full")
    back = StableDiffusion.from_pretrained(path, device="cpu", tokenizer=folder)
    assert isinstance(back, StableDiffusion3)
    same_config(ours, back)
    same_networks(ours, back)
    mmdit = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    theirs = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(mmdit)
    mine = ours.transformer.state_dict()
    assert theirs.keys() == mine.keys() and all(torch.equal(v, mine[k]) for k, v in theirs.items())


@pytest.mark.parametrize("name,cfg", [("SD3 Medium", SD3_MEDIUM), ("SD3.5 Medium", SD35_MEDIUM),
                                      ("SD3.5 Large", SD35_LARGE)])
def test_single_file_layout_of_real_transformers(name, cfg):
    """At the real sizes (meta tensors): our Stability-layout keys are the ones diffusers' converter takes
    (qk norm, dual attention, the last block's missing text projections), and the config read back off the
    shapes is the model's."""
    with torch.device("meta"):
        sd = MMDiT(cfg).state_dict()
    stability = mmdit_to_single_file(sd, cfg)
    assert infer_mmdit_config(stability) == cfg, name
    theirs = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(
        {"model.diffusion_model." + k: v for k, v in stability.items()})
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in sd.items()}, name
    assert family_of_state_dict({"model.diffusion_model." + k: v for k, v in stability.items()}).name == "sd3"


def test_single_file_clip_l_without_projection_reads_as_identity(full, tmp_path):
    """SD 3's own files carry CLIP-L without text_projection (its pooled vector is unprojected): diffusers puts
    in the identity, and so does minisd."""
    ours, folder = full
    sd = to_sd3_single_file(ours.components())
    del sd["text_encoders.clip_l.transformer.text_projection.weight"]
    from minisd.formats.weights import write_safetensors
    write_safetensors(sd, tmp_path / "no_projection.safetensors", {"minisd_config": ours.config.to_json()})
    back = StableDiffusion.from_pretrained(tmp_path / "no_projection.safetensors", device="cpu", tokenizer=folder)
    assert torch.equal(back.text_encoder.text_projection.weight, torch.eye(32))


# ─── bad input ─────────────────────────────────────────────────────────────────────────────────────

def test_bad_folders_say_what_is_wrong(full, tmp_path):
    _, folder = full
    broken = tmp_path / "no_transformer"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(WeightsError, match="has no transformer/ folder"):
        StableDiffusion.from_pretrained(broken, device="cpu")
    wrong = tmp_path / "wrong_width"
    shutil.copytree(folder, wrong)
    config = json.loads((wrong / "transformer" / "config.json").read_text())
    (wrong / "transformer" / "config.json").write_text(json.dumps(config | {"joint_attention_dim": 96}))
    with pytest.raises(WeightsError, match=r"joint_attention_dim 96 must equal the T5 width") as e:
        StableDiffusion.from_pretrained(wrong, device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="pooled_projection_dim"):
        replace(SMALL, transformer=replace(SMALL.transformer, pooled_projection_dim=64))
    with pytest.raises(ValueError, match="prediction_type"):
        replace(SMALL, scheduler=SchedulerConfig())


def test_bad_call_arguments(full):
    ours, _ = full
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPTS[0], height=72, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match="max_sequence_length"):
        ours(PROMPTS[0], max_sequence_length=1000, num_inference_steps=1)
    with pytest.raises(ValueError, match="cannot sample a model that predicts 'flow'"):
        ours(PROMPTS[0], sampler="ddim", num_inference_steps=1, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="img2img is not available for SD 3"):
        ours.img2img(PROMPTS[0], torch.zeros(1, 3, SIZE, SIZE))


# ─── the tiny variant (one CLIP encoder: the shapes world's) ───────────────────────────────────────

def test_tiny_variant_generates_and_round_trips(tokenizers, tmp_path):
    """TextEncoder width 32, no projection; the MMDiT reads its last hidden state (joint_attention_dim 32) and
    its EOS state (pooled 32). Its folder loads back equal; its transformer/ loads in diffusers."""
    te = replace(_CLIP, with_projection=False)
    transformer = replace(SMALL.transformer, in_channels=4, out_channels=4, joint_attention_dim=32,
                          pooled_projection_dim=32)
    vae = VAEConfig(block_out_channels=(16, 16, 32), norm_num_groups=8, sample_size=32, scaling_factor=0.9)
    cfg = replace(SMALL, transformer=transformer, vae=vae, text_encoder=te, text_encoder_2=None, text_encoder_3=None,
                  scheduler=SchedulerConfig(prediction_type="flow"))
    pipe = StableDiffusion3.from_config(cfg, tokenizers[0], seed=2)
    pipe.progress = False
    assert pipe.is_tiny and pipe.image_size == 32
    context, pooled = pipe.encode_text_sd3(PROMPTS)
    ids = pipe.tokenizer(PROMPTS)
    assert torch.equal(context, pipe.text_encoder(ids)) and torch.equal(pooled, pipe.text_encoder.pooled(ids, context))
    images = pipe(PROMPTS, num_inference_steps=3, seed=0, output_type="pt")
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    pipe.save_pretrained(tmp_path / "tiny_sd3")
    index = json.loads((tmp_path / "tiny_sd3" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_2"] == [None, None]
    back = StableDiffusion.from_pretrained(tmp_path / "tiny_sd3", device="cpu")
    assert isinstance(back, StableDiffusion3) and back.is_tiny
    same_config(pipe, back)
    same_networks(pipe, back)
    back.progress = False
    report("sd3 tiny save_pretrained -> from_pretrained images", back(PROMPTS, num_inference_steps=3, seed=0,
                                                                       output_type="pt"), images, 1e-5)
    theirs = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "tiny_sd3" / "transformer").state_dict()
    mine = pipe.transformer.state_dict()
    assert theirs.keys() == mine.keys() and all(torch.equal(v, mine[k]) for k, v in theirs.items())
    with pytest.raises(ValueError, match="must be too"):
        replace(cfg, transformer=replace(transformer, joint_attention_dim=40))


def test_tiny_from_networks(tokenizers):
    """StableDiffusion3.tiny(transformer, vae, text_encoder, tokenizer): what the shapes world's training saves."""
    from minisd import AutoencoderKL, TextEncoder
    te = TextEncoder(replace(_CLIP, with_projection=False))
    vae = AutoencoderKL(VAEConfig(block_out_channels=(16, 16), norm_num_groups=8, sample_size=16))
    transformer = MMDiT(replace(SMALL.transformer, in_channels=4, out_channels=4, joint_attention_dim=32,
                                pooled_projection_dim=32, sample_size=8))
    pipe = StableDiffusion3.tiny(transformer, vae, te, tokenizers[0], flow_shift=2.0)
    assert pipe.scheduler.shift == 2.0 and pipe.scheduler.prediction_type == "flow" and pipe.image_size == 16
    with pytest.raises(ValueError, match="must be too"):
        StableDiffusion3.tiny(MMDiT(replace(transformer.config, joint_attention_dim=40)), vae, te, tokenizers[0])
