"""The SDXL pipeline equals diffusers' StableDiffusionXL(Img2Img)Pipeline: the same random weights (SDXL's
topology at toy widths, tests/test_sdxl.py's SMALL and SMALL_REFINER), prompts, noise and sampler give the
same latents and images (fp32 CPU, relative max difference <= 1e-3, as tests/test_parity_pipeline.py).
diffusers reads minisd's save_pretrained folders, so the folder layout is checked on the way."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import WORDS, report
from test_lora import TE_TARGETS, UNET_TARGETS, kohya_weights
from test_sdxl import SMALL, SMALL_REFINER

from minisd import StableDiffusion, StableDiffusionXL
from minisd.diffusion.samplers import SAMPLERS
from minisd.models.tokenizer import Tokenizer, build_word_tokenizer
from minisd.pipeline_xl import save_single_file

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle on the left", "a large blue square at the top"]
SIZE = 64  # pixels: 8×8 latents


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """CLIP's tokenizer pads with EOS; bigG's (tokenizer_2) with "!", as in SDXL's repos."""
    tok = build_word_tokenizer(list(WORDS), tmp_path_factory.mktemp("tokenizer"))
    folder = tmp_path_factory.mktemp("tokenizer_2")
    build_word_tokenizer(list(WORDS), folder)
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    tok_2 = Tokenizer(folder)
    assert tok_2.pad_id != tok_2.eos_id
    return tok, tok_2


def folder_pair(cfg, tokenizers, tmp_path_factory, name, seed):
    """(minisd pipeline, its save_pretrained folder)."""
    pipe = StableDiffusionXL.from_config(cfg, *tokenizers, seed=seed)
    pipe.progress = False
    folder = tmp_path_factory.mktemp(name)
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def base(tokenizers, tmp_path_factory):
    return folder_pair(SMALL, tokenizers, tmp_path_factory, "sdxl_base", seed=0)


@pytest.fixture(scope="module")
def refiner(tokenizers, tmp_path_factory):
    return folder_pair(SMALL_REFINER, tokenizers, tmp_path_factory, "sdxl_refiner", seed=1)


def reference(cls, folder, sampler: str):
    pipe = getattr(diffusers, cls).from_pretrained(folder, add_watermarker=False)
    pipe.scheduler = getattr(diffusers, SAMPLERS[sampler].diffusers_class).from_pretrained(folder, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
def test_txt2img_matches_diffusers(sampler, base):
    """CFG 5 with negative prompts: context, pooled and time ids all go through both branches."""
    ours, folder = base
    ref = reference("StableDiffusionXLPipeline", folder, sampler)
    common = dict(num_inference_steps=6, guidance_scale=5.0, latents=noise((2, 4, 8, 8)), height=SIZE, width=SIZE,
                  negative_prompt=["green", "black background"], output_type="pt")
    expected = ref(PROMPTS, generator=torch.Generator().manual_seed(7), **common).images
    report(f"sdxl txt2img {sampler} images (CFG 5, negative prompts)",
           ours(PROMPTS, sampler=sampler, generator=torch.Generator().manual_seed(7), **common), expected, 1e-3)


def test_micro_conditioning_and_zeroed_negative(base):
    """original_size / crops_coords_top_left / target_size and negative_* sizes (other time ids per branch);
    no negative prompt (zeros for the unconditional context and pooled). diffusers' txt2img pipeline tiles
    the pair [negative ids, ids] over the batch, so its rows disagree with its contexts beyond one picture
    when the two differ: negative sizes are compared on one picture, 2 pictures with the same ids."""
    ours, folder = base
    ref = reference("StableDiffusionXLPipeline", folder, "euler")
    sizes = dict(original_size=(128, 96), crops_coords_top_left=(8, 4), target_size=(64, 48))
    negative_sizes = dict(negative_original_size=(32, 32), negative_crops_coords_top_left=(2, 0),
                          negative_target_size=(16, 24))
    common = dict(num_inference_steps=5, guidance_scale=4.0, height=SIZE, width=SIZE, output_type="latent")
    for n, extra in ((1, negative_sizes), (2, {})):
        args = common | sizes | extra | dict(num_images_per_prompt=n)
        expected = ref(PROMPTS[0], generator=torch.Generator().manual_seed(3), **args).images
        mine = ours(PROMPTS[0], generator=torch.Generator().manual_seed(3), **args)
        report(f"sdxl micro-conditioning latents (zeroed negative, {n} picture(s), {sorted(extra) or 'no negative sizes'})",
               mine, expected, 1e-3)
    plain = ours(PROMPTS[0], generator=torch.Generator().manual_seed(3), num_images_per_prompt=2, **common)
    assert (plain - mine).abs().max() > 1e-3  # the size and crop ids change the picture


def test_empty_negative_prompt_is_encoded_not_zeroed(base):
    ours, _ = base
    cond, zeroed = ours.encode_prompt_xl(PROMPTS[0])
    _, encoded = ours.encode_prompt_xl(PROMPTS[0], negative_prompt="")
    assert zeroed[0].abs().max() == 0 and zeroed[1].abs().max() == 0
    assert encoded[0].abs().max() > 0 and cond[0].shape == (1, 77, 64) and cond[1].shape == (1, 24)


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_base_then_refiner_matches_diffusers(sampler, base, refiner):
    """denoising_end=0.8 on the base, its latents part-way into the refiner with denoising_start=0.8
    (aesthetic scores in the refiner's time ids; its unconditional branch encodes "")."""
    (ours_base, base_folder), (ours_refiner, refiner_folder) = base, refiner
    ref_base = reference("StableDiffusionXLPipeline", base_folder, sampler)
    ref_refiner = reference("StableDiffusionXLImg2ImgPipeline", refiner_folder, sampler)
    common = dict(num_inference_steps=10, guidance_scale=5.0, height=SIZE, width=SIZE)
    handed = ref_base(PROMPTS, latents=noise((2, 4, 8, 8), 2), denoising_end=0.8, output_type="latent", **common).images
    mine_handed = ours_base(PROMPTS, latents=noise((2, 4, 8, 8), 2), denoising_end=0.8, output_type="latent",
                            sampler=sampler, **common)
    report(f"sdxl base {sampler} latents at denoising_end=0.8", mine_handed, handed, 1e-3)
    refined = dict(num_inference_steps=10, guidance_scale=5.0, denoising_start=0.8, output_type="pt",
                   aesthetic_score=7.0, negative_aesthetic_score=2.0)
    expected = ref_refiner(PROMPTS, image=handed, **refined).images
    mine = ours_refiner(PROMPTS, latents=mine_handed, sampler=sampler, **refined)
    report(f"sdxl base -> refiner {sampler} images (split at 0.8)", mine, expected, 1e-3)


def test_split_schedule_errors(base):
    ours, _ = base
    with pytest.raises(ValueError, match="denoising_end must be a number strictly between 0 and 1"):
        ours(PROMPTS[0], num_inference_steps=2, height=SIZE, width=SIZE, denoising_end=1.5)
    with pytest.raises(ValueError, match="denoising_start continues from latents of shape"):
        ours(PROMPTS[0], num_inference_steps=2, height=SIZE, width=SIZE, denoising_start=0.5)


def test_folder_and_single_file_load_back(base, tmp_path):
    """from_pretrained returns StableDiffusionXL for an SDXL folder and for its single file; same image."""
    ours, folder = base
    args = dict(num_inference_steps=3, height=SIZE, width=SIZE, seed=5, output_type="pt")
    expected = ours(PROMPTS[0], **args)
    from_folder = StableDiffusion.from_pretrained(folder, device="cpu")
    save_single_file(ours, tmp_path / "small_xl.safetensors")
    from_file = StableDiffusion.from_pretrained(tmp_path / "small_xl.safetensors", device="cpu",
                                                tokenizer=ours.tokenizer)
    assert isinstance(from_folder, StableDiffusionXL) and isinstance(from_file, StableDiffusionXL)
    from_folder.progress = from_file.progress = False
    report("sdxl save_pretrained -> from_pretrained images", from_folder(PROMPTS[0], **args), expected, 1e-5)
    # one tokenizer given for both: bigG's pads with EOS here, so compare the networks, not the picture
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, back = getattr(ours, name).state_dict(), getattr(from_file, name).state_dict()
        assert mine.keys() == back.keys() and all(torch.equal(v, back[k]) for k, v in mine.items()), name


def inpaint_inputs():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:48, 4:40] = 255
    return picture, Image.fromarray(mask)


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
@pytest.mark.parametrize("strength", [0.9999, 0.7])
def test_inpaint_matches_diffusers(sampler, strength, base):
    """The 4-channel base U-Net with the known latents pasted back outside the mask after each step, as
    diffusers' StableDiffusionXLInpaintPipeline (its way: keep_unmasked=False, masked_content="original")."""
    ours, folder = base
    ref = reference("StableDiffusionXLInpaintPipeline", folder, sampler)
    picture, mask = inpaint_inputs()
    common = dict(strength=strength, num_inference_steps=8, guidance_scale=5.0, output_type="pt",
                  negative_prompt="green", height=SIZE, width=SIZE)
    expected = ref(PROMPTS[0], image=picture, mask_image=mask, generator=torch.Generator().manual_seed(9),
                   **common).images
    mine = ours.inpaint(PROMPTS[0], picture, mask, sampler=sampler, generator=torch.Generator().manual_seed(9),
                        keep_unmasked=False, masked_content="original", **common)
    report(f"sdxl inpaint {sampler} strength {strength} images", mine, expected, 1e-3)


def test_inpaint_keeps_what_is_not_masked_by_default(base):
    ours, _ = base
    picture, mask = inpaint_inputs()
    out = ours.inpaint(PROMPTS[1], picture, mask, num_inference_steps=4, seed=0, output_type="pt")[0]
    outside = torch.from_numpy(__import__("numpy").asarray(mask)) == 0
    original = torch.from_numpy(__import__("numpy").asarray(picture)).permute(2, 0, 1) / 255
    far = outside.clone()
    far[0:56, 0:48] = False   # 8 px beyond the mask: past the seam's feathering (σ = 2 px)
    assert (out[:, far] - original[:, far]).abs().max() < 1 / 255 + 1e-6
    with pytest.raises(ValueError, match="needs an image and a mask_image, got no mask_image"):
        ours.inpaint(PROMPTS[1], picture, None)


# ─── LoRAs: kohya's SDXL files (sgm block names, lora_te1_/lora_te2_) and diffusers/PEFT ones ───────
def random_sdxl_kohya(pipe, sgm_names: bool, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """A kohya SDXL LoRA with random non-zero A and B on every usual target of the U-Net and both text
    encoders; the U-Net's keys in sgm's block names (input_blocks_4_1_…, as kohya's sd-scripts writes them)
    or in diffusers' (down_blocks_1_attentions_0_…)."""
    from torch import nn

    from minisd.formats.sdxl import sdxl_unet_prefix_table
    from minisd.formats.weights import _rename

    g = torch.Generator().manual_seed(seed)
    names = {}
    if sgm_names:
        paths = [n for n, m in pipe.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        sgm = _rename({p + ".weight": None for p in paths}, sdxl_unet_prefix_table(pipe.unet.config), "", reverse=True)
        names = {p: k.removesuffix(".weight") for k, p in zip(sgm, paths)}
    roots = [("lora_unet_", pipe.unet, UNET_TARGETS), ("lora_te1_", pipe.text_encoder, TE_TARGETS),
             ("lora_te2_", pipe.text_encoder_2, TE_TARGETS)]
    return kohya_weights(roots, names, rank, alpha, g)


@pytest.mark.parametrize("sgm_names", [True, False], ids=["sgm block names", "diffusers block names"])
def test_kohya_sdxl_lora_matches_diffusers(sgm_names, base, tmp_path):
    from safetensors.torch import save_file

    ours, folder = base
    ref = reference("StableDiffusionXLPipeline", folder, "euler")
    path = tmp_path / "kohya_sdxl.safetensors"
    lora = random_sdxl_kohya(ours, sgm_names)
    save_file(lora, path, metadata={"ss_network_module": "networks.lora"})
    before = ours(PROMPTS[0], num_inference_steps=4, guidance_scale=5.0, latents=noise((1, 4, 8, 8), 4), output_type="pt")
    name = ours.load_lora(path)
    ref.load_lora_weights(path, adapter_name="kohya")
    common = dict(num_inference_steps=4, guidance_scale=5.0, latents=noise((1, 4, 8, 8), 4), output_type="pt",
                  height=SIZE, width=SIZE)
    try:
        placed = {k for lo in ours.loras[name] for k in [lo.partition(".")[0]]}
        assert placed == {"unet", "text_encoder", "text_encoder_2"}
        assert 3 * len(ours.loras[name]) == len(lora)              # every key placed (down, up, alpha)
        mine = ours(PROMPTS[0], **common)
        report(f"sdxl kohya LoRA ({'sgm' if sgm_names else 'diffusers'} names) images", mine,
               ref(PROMPTS[0], **common).images, 1e-3)
        assert (mine - before).abs().max() > 1e-2                   # the LoRA changes the picture
        ours.set_lora_scale(name, 0.5)
        ref.set_adapters(["kohya"], [0.5])
        report("sdxl kohya LoRA at scale 0.5 images", ours(PROMPTS[0], **common), ref(PROMPTS[0], **common).images, 1e-3)
    finally:
        ours.unload_lora()
        ref.unload_lora_weights()


def test_peft_sdxl_lora_written_by_minisd_loads_in_diffusers(base, tmp_path):
    """save_lora writes unet.…, text_encoder.… and text_encoder_2.… keys; diffusers reads them the same."""
    from minisd.adapters import lora as L

    ours, folder = base
    ours.load_lora(random_sdxl_kohya(ours, sgm_names=True, alpha=8.0, seed=1), name="k")
    out = L.save_lora(ours.loras["k"], tmp_path / "peft")
    ref = reference("StableDiffusionXLPipeline", folder, "euler")
    ref.load_lora_weights(tmp_path / "peft")
    common = dict(num_inference_steps=4, guidance_scale=5.0, latents=noise((1, 4, 8, 8), 6), output_type="pt",
                  height=SIZE, width=SIZE)
    try:
        assert {k.split(".")[0] for k in L.read_state_dict(out)} == {"unet", "text_encoder", "text_encoder_2"}
        report("sdxl PEFT LoRA written by minisd, images", ours(PROMPTS[1], **common), ref(PROMPTS[1], **common).images,
               1e-3)
        ours.unload_lora()
        ours.load_lora(out, name="back")
        report("sdxl PEFT LoRA read back by minisd, images", ours(PROMPTS[1], **common),
               ref(PROMPTS[1], **common).images, 1e-3)
    finally:
        ours.unload_lora()
        ref.unload_lora_weights()


def test_a_lora_on_the_fly_is_refused_when_saving_and_a_fused_one_saved(base, tmp_path):
    ours, _ = base
    ours.load_lora(random_sdxl_kohya(ours, sgm_names=True, seed=2), name="s")
    try:
        with pytest.raises(RuntimeError, match="applied on the fly"):
            ours.save_pretrained(tmp_path / "unfused")
        ours.fuse_lora()
        args = dict(num_inference_steps=3, height=SIZE, width=SIZE, seed=5, output_type="pt")
        want = ours(PROMPTS[0], **args)
        ours.save_pretrained(tmp_path / "fused")
        back = StableDiffusion.from_pretrained(tmp_path / "fused", device="cpu")
        back.progress = False
        report("sdxl fused LoRA saved and loaded back, images", back(PROMPTS[0], **args), want, 1e-5)
    finally:
        ours.unfuse_lora()
        ours.unload_lora()


# diffusers tells SDXL's two text encoders in a single file apart by their widths (768 and 1280): here too
# the second is wider than the first, or diffusers would read CLIP ViT-L's weights into both.
WIDE = replace(SMALL, unet=replace(SMALL.unet, cross_attention_dim=32 + 48),
               text_encoder_2=replace(SMALL.text_encoder_2, hidden_size=48, intermediate_size=96))


def test_diffusers_reads_the_single_file_minisd_writes(tokenizers, tmp_path_factory):
    """diffusers' from_single_file (given the folder's configs, as it would take them from the Hub) reads
    save_single_file's sgm layout: the same networks, bit for bit, and the same pictures."""
    ours, folder = folder_pair(WIDE, tokenizers, tmp_path_factory, "sdxl_wide", seed=3)
    path = folder.parent / "wide_xl.safetensors"
    save_single_file(ours, path)
    ref = diffusers.StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), add_watermarker=False)
    plain = lambda sd: {k.removeprefix("text_model."): v for k, v in sd.items()}  # noqa: E731 (transformers 5 drops it)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = plain(getattr(ours, name).state_dict()), plain(getattr(ref, name).state_dict())
        missing = sorted(set(mine) - set(theirs) - {"embeddings.position_ids"})
        assert not missing, (name, missing[:5])
        differ = [k for k, v in mine.items() if k in theirs and (v.shape != theirs[k].shape or not torch.equal(v, theirs[k]))]
        assert not differ, (name, differ[:5])
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    ref.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=4, guidance_scale=5.0, latents=noise((1, 4, 8, 8), 8), output_type="pt",
                  height=SIZE, width=SIZE)
    report("sdxl single file read by diffusers, images", ours(PROMPTS[0], **common), ref(PROMPTS[0], **common).images,
           1e-3)


# ─── textual inversion: {"clip_l": …, "clip_g": …}, as AUTOMATIC1111 and kohya write SDXL embeddings ────
def random_sdxl_embedding(pipe, n: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"clip_l": torch.randn(n, pipe.text_encoder.get_input_embeddings().embedding_dim, generator=g),
            "clip_g": torch.randn(n, pipe.text_encoder_2.get_input_embeddings().embedding_dim, generator=g)}


def test_sdxl_textual_inversion_matches_diffusers(base, tmp_path):
    """One file, two sets of vectors: minisd loads both; diffusers is called once per encoder."""
    from safetensors.torch import save_file

    ours, folder = base
    vectors = random_sdxl_embedding(ours)
    path = tmp_path / "shiny.safetensors"
    save_file(vectors, path)
    ref = reference("StableDiffusionXLPipeline", folder, "euler")
    prompt = "a shiny circle on the left"
    common = dict(num_inference_steps=4, guidance_scale=5.0, latents=noise((1, 4, 8, 8), 3), output_type="pt",
                  height=SIZE, width=SIZE)
    before = ours(prompt, **common)
    assert ours.load_textual_inversion(path) == "shiny"
    ref.load_textual_inversion(vectors["clip_l"], token="shiny", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(vectors["clip_g"], token="shiny", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    try:
        mine = ours(prompt, **common)
        report("sdxl textual inversion (2 vectors per encoder) images", mine, ref(prompt, **common).images, 1e-3)
        assert (mine - before).abs().max() > 1e-2
    finally:
        ours.unload_textual_inversion()
    assert torch.equal(ours(prompt, **common), before)      # unloaded: as it was
    assert "shiny" not in ours.tokenizer and "shiny" not in ours.tokenizer_2


def test_sdxl_textual_inversion_refuses_what_does_not_fit(base):
    ours, _ = base
    vectors = random_sdxl_embedding(ours)
    with pytest.raises(ValueError, match="not an SDXL embedding: it holds emb_params"):
        ours.load_textual_inversion({"emb_params": vectors["clip_l"]}, token="<x>")
    with pytest.raises(ValueError, match="is 64 wide"):
        ours.load_textual_inversion({"clip_l": vectors["clip_l"], "clip_g": torch.zeros(2, 64)}, token="<x>")
    assert not ours.textual_inversions and "<x>" not in ours.tokenizer and "<x>" not in ours.tokenizer_2


# ─── ControlNet-XL: the SDXL U-Net's encoder copied, with the added (pooled, size ids) embedding ───────
def random_xl_controlnet(pipe, seed: int = 0):
    from minisd.adapters.controlnet import ControlNet

    cn = ControlNet.from_unet(pipe.unet, (8, 16, 16, 32))    # three stride-2 steps: 64 px -> 8×8 latents
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return cn


@pytest.mark.parametrize("case", ["plain", "guess mode"])
def test_sdxl_controlnet_matches_diffusers(case, base, tmp_path):
    import numpy as np
    from PIL import Image

    from minisd.adapters.controlnet import save_controlnet

    ours, folder = base
    cn_folder = tmp_path / "controlnet_xl"
    save_controlnet(random_xl_controlnet(ours), cn_folder)
    ref = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
        folder, controlnet=diffusers.ControlNetModel.from_pretrained(cn_folder), add_watermarker=False)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    ref.set_progress_bar_config(disable=True)
    hint = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    guess = case == "guess mode"
    common = dict(num_inference_steps=5, guidance_scale=5.0, latents=noise((1, 4, 8, 8), 11), output_type="pt",
                  height=SIZE, width=SIZE, negative_prompt="green")
    expected = ref(PROMPTS[0], image=hint, controlnet_conditioning_scale=0.8, guess_mode=guess, **common).images
    ours.load_controlnet(cn_folder)
    try:
        mine = ours(PROMPTS[0], control_image=hint, controlnet_scale=0.8, guess_mode=guess, **common)
        without = ours(PROMPTS[0], control_image=hint, controlnet_scale=0.0, **common)
    finally:
        ours.unload_controlnet()
    assert (mine - without).abs().max() > 1e-3          # the ControlNet changes the picture
    report(f"sdxl ControlNet pipeline, {case}, images", mine, expected, 1e-3)


def test_sdxl_textual_inversion_with_one_tokenizer_for_both_encoders(base, tmp_path):
    """A single file loaded with one tokenizer given serves both encoders from it: the token is added once,
    and each encoder gets its own vectors at that id; unloading restores both."""
    ours, _ = base
    save_single_file(ours, tmp_path / "xl.safetensors")
    shared = StableDiffusion.from_pretrained(tmp_path / "xl.safetensors", device="cpu",
                                             tokenizer=Tokenizer(ours.tokenizer.folder))
    assert shared.tokenizer is shared.tokenizer_2
    sizes = [e.get_input_embeddings().num_embeddings for e in shared.text_encoders]
    vectors = random_sdxl_embedding(shared, n=1)
    shared.load_textual_inversion(vectors, token="<shiny>")
    i = shared.tokenizer.hf.convert_tokens_to_ids("<shiny>")
    for encoder, key in zip(shared.text_encoders, ("clip_l", "clip_g")):
        assert torch.equal(encoder.get_input_embeddings().weight[i], vectors[key][0])
    shared.unload_textual_inversion()
    assert "<shiny>" not in shared.tokenizer
    assert [e.get_input_embeddings().num_embeddings for e in shared.text_encoders] == sizes
