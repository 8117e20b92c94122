"""Textual inversion: every common file layout loads as diffusers' `load_textual_inversion` loads it
(token ids, text-encoder outputs and images equal, fp32 CPU, relative max difference <= 1e-4 / 1e-3),
for the word-level tokenizer of the tiny models and SD 1.x's BPE tokenizer; unloading restores the
model exactly; bad files get one clear ValueError."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import TEST, report
from safetensors.torch import save_file

from minisd import StableDiffusion
from minisd.models.tokenizer import Tokenizer

diffusers = pytest.importorskip("diffusers")

E = TEST.text_encoder.hidden_size  # 32: the width of the test text encoder's token embeddings


def vectors(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, E, generator=torch.Generator().manual_seed(seed))


def ours_and_ref(folder) -> tuple[StableDiffusion, object]:
    """Fresh pipelines (loading textual inversions changes them) from the same folder."""
    ours = StableDiffusion.from_pretrained(folder, device="cpu")
    ours.progress = False
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    return ours, ref


def ref_ids(ref, prompts: list[str]) -> torch.Tensor:
    """diffusers' tokenization: its multi-vector expansion, then the CLIP tokenizer."""
    prompts = ref.maybe_convert_prompt(prompts, ref.tokenizer)
    return ref.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def assert_same_as_diffusers(ours, ref, prompts: list[str], what: str, images: bool = True) -> None:
    ids = ours.tokenizer(prompts)
    assert torch.equal(ids, ref_ids(ref, prompts)), f"{what}: token ids differ"
    with torch.no_grad():
        report(f"{what}: text encoder", ours.text_encoder(ids), ref.text_encoder(ids)[0], 1e-4)
    if images:
        latents = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
        negative = [p.replace("a ", "no ") for p in prompts]  # the token in the negative prompt too
        kw = {"num_inference_steps": 3, "guidance_scale": 7.5, "latents": latents, "output_type": "pt"}
        expected = ref(prompts, negative_prompt=negative, **kw).images
        report(f"{what}: images", ours(prompts, negative_prompt=negative, sampler="ddim", **kw), expected, 1e-3)


# ─── the layouts, each against diffusers ─────────────────────────────────────────────────────────────

def test_diffusers_folder_safetensors(tiny_folder, tmp_path):
    save_file({"<cat-toy>": vectors(1, 0)[0]}, tmp_path / "learned_embeds.safetensors")  # (E,), as the script saves
    ours, ref = ours_and_ref(tiny_folder)
    assert ours.load_textual_inversion(tmp_path) == "<cat-toy>"
    ref.load_textual_inversion(str(tmp_path))
    assert len(ours.tokenizer) == len(ref.tokenizer)
    assert_same_as_diffusers(ours, ref, ["a <cat-toy> on the left", "a red circle"], "diffusers .safetensors")


def test_diffusers_bin_multi_vector(tiny_folder, tmp_path):
    """Three vectors: tokens <style>, <style>_1, <style>_2, and <style> in a prompt becomes all three."""
    torch.save({"<style>": vectors(3, 1)}, tmp_path / "learned_embeds.bin")
    ours, ref = ours_and_ref(tiny_folder)
    ours.load_textual_inversion(tmp_path / "learned_embeds.bin")
    ref.load_textual_inversion(str(tmp_path / "learned_embeds.bin"))
    n = len(ours.tokenizer)
    assert ours.tokenizer.decode(ours.tokenizer(["a <style> cat"])[0, :6]) == \
        ["<|startoftext|>", "a</w>", "<style>", "<style>_1", "<style>_2", "cat</w>"]
    assert ours.text_encoder.get_input_embeddings().num_embeddings == n
    assert_same_as_diffusers(ours, ref, ["a <style> cat", "<style> <style>, a blue square"], "multi-vector .bin")


def test_a1111_pt_and_safetensors(tiny_folder, tmp_path):
    """A1111 .pt names its token inside; its .safetensors does not (token=, or the file's stem)."""
    pt = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors(2, 2))},
          "name": "mystyle", "step": 500, "sd_checkpoint": "e1441589", "sd_checkpoint_name": "v1-5"}
    torch.save(pt, tmp_path / "mystyle.pt")
    save_file({"emb_params": vectors(2, 3)}, tmp_path / "charturner.safetensors")
    ours, ref = ours_and_ref(tiny_folder)
    assert ours.load_textual_inversion(tmp_path / "mystyle.pt") == "mystyle"
    assert ours.load_textual_inversion(tmp_path / "charturner.safetensors", token="<turn>") == "<turn>"
    ref.load_textual_inversion(str(tmp_path / "mystyle.pt"))
    ref.load_textual_inversion(str(tmp_path / "charturner.safetensors"), token="<turn>")
    assert_same_as_diffusers(ours, ref, ["a mystyle star", "<turn> a cat at the top"], "A1111 .pt and .safetensors")
    ours.unload_textual_inversion()
    assert ours.load_textual_inversion(tmp_path / "charturner.safetensors") == "charturner"  # A1111's name


def test_sd1_bpe_tokenizer(tmp_path):
    """The CLIP ViT-L/14 tokenizer (49,408 ids, BPE): new ids from 49,408 on, outputs as diffusers'."""
    config = replace(TEST, text_encoder=replace(TEST.text_encoder, vocab_size=49408))
    StableDiffusion.from_config(config, Tokenizer.clip_vit_l(), seed=0).save_pretrained(tmp_path / "model")
    torch.save({"<cat-toy>": vectors(2, 4)}, tmp_path / "cat.bin")
    ours, ref = ours_and_ref(tmp_path / "model")
    ours.load_textual_inversion(tmp_path / "cat.bin")
    ref.load_textual_inversion(str(tmp_path / "cat.bin"))
    ids = ours.tokenizer(["a photo of a <cat-toy>, watercolor"])[0]
    assert ids[5:7].tolist() == [49408, 49409]
    assert_same_as_diffusers(ours, ref, ["a photo of a <cat-toy>, watercolor"], "SD 1.x BPE", images=False)


def test_state_dict_and_tensor_sources(tiny_folder):
    ours, ref = ours_and_ref(tiny_folder)
    v = vectors(1, 5)
    ours.load_textual_inversion({"<a>": v}), ours.load_textual_inversion(vectors(2, 6), token="<b>")
    ref.load_textual_inversion({"<a>": v}), ref.load_textual_inversion(vectors(2, 6), token="<b>")
    assert_same_as_diffusers(ours, ref, ["<a> and <b>"], "state dict and tensor", images=False)


def test_saved_pipeline_keeps_the_tokens(tiny_folder, tmp_path):
    """save_pretrained with an embedding loaded: the tokens and rows come back, in minisd and diffusers."""
    ours, _ = ours_and_ref(tiny_folder)
    ours.load_textual_inversion({"<star>": vectors(2, 7)})
    ours.save_pretrained(tmp_path / "saved")
    again, ref = ours_and_ref(tmp_path / "saved")
    assert len(again.tokenizer) == len(ours.tokenizer) == again.text_encoder.config.vocab_size
    assert torch.equal(again.tokenizer(["a <star>"]), ours.tokenizer(["a <star>"]))
    assert_same_as_diffusers(again, ref, ["a <star> at the top"], "saved with an embedding", images=False)


# ─── unloading ───────────────────────────────────────────────────────────────────────────────────────

def test_unload_restores_the_model_exactly(tiny_folder):
    ours, _ = ours_and_ref(tiny_folder)
    prompt = ["a <x> <y> red circle"]
    ids, n = ours.tokenizer(prompt), len(ours.tokenizer)
    weight = ours.text_encoder.get_input_embeddings().weight.clone()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    generate = {"num_inference_steps": 2, "guidance_scale": 1.0, "latents": latents, "output_type": "latent"}
    before = ours(prompt, **generate)
    ours.load_textual_inversion({"<x>": vectors(3, 8)}), ours.load_textual_inversion({"<y>": vectors(1, 9)})
    assert len(ours.tokenizer) == n + 4 and not torch.equal(ours.tokenizer(prompt), ids)
    ours.unload_textual_inversion()
    assert len(ours.tokenizer) == n and ours.text_encoder.config.vocab_size == weight.shape[0] == 1000
    assert torch.equal(ours.text_encoder.get_input_embeddings().weight, weight)
    assert torch.equal(ours.tokenizer(prompt), ids)
    assert torch.equal(ours(prompt, **generate), before)
    ours.unload_textual_inversion()  # nothing loaded: nothing to do


def test_unload_one_matches_diffusers(tiny_folder):
    """The others stay, their ids closed up as diffusers' unload_textual_inversion(token) leaves them."""
    ours, ref = ours_and_ref(tiny_folder)
    for pipe in (ours, ref):
        pipe.load_textual_inversion({"<x>": vectors(2, 10)})
        pipe.load_textual_inversion({"<y>": vectors(1, 11)})
    ours.unload_textual_inversion("<x>")
    ref.unload_textual_inversion(["<x>", "<x>_1"])  # diffusers removes only the tokens named
    assert list(ours.textual_inversions) == ["<y>"]
    assert_same_as_diffusers(ours, ref, ["a <y> and <x>"], "after unloading one", images=False)
    with pytest.raises(ValueError, match="no textual inversion with token '<x>'"):
        ours.unload_textual_inversion("<x>")


# ─── bad input ───────────────────────────────────────────────────────────────────────────────────────

def test_bad_embeddings_get_clear_errors(tiny_folder, tmp_path):
    ours, _ = ours_and_ref(tiny_folder)
    n, weight = len(ours.tokenizer), ours.text_encoder.get_input_embeddings().weight.clone()
    with pytest.raises(ValueError, match=r"'<w>' is 768 wide, but this text encoder's token embeddings are 32"):
        ours.load_textual_inversion({"<w>": torch.randn(768)})
    with pytest.raises(ValueError, match=r"holds 2 embeddings \(<a>, <b>\); pass token="):
        ours.load_textual_inversion({"<a>": vectors(1, 0), "<b>": vectors(1, 1)})
    assert ours.load_textual_inversion({"<a>": vectors(1, 0), "<b>": vectors(1, 1)}, token="<b>") == "<b>"
    with pytest.raises(ValueError, match="'<b>' is already in the tokenizer's vocabulary"):
        ours.load_textual_inversion({"<b>": vectors(1, 2)})
    with pytest.raises(ValueError, match="'a' is already in the tokenizer's vocabulary"):  # a BPE piece
        ours.load_textual_inversion({"a": vectors(1, 2)})
    with pytest.raises(ValueError, match="'<c>_1' is already in"):  # a multi-vector name taken
        ours.load_textual_inversion({"<c>_1": vectors(1, 3)}), ours.load_textual_inversion({"<c>": vectors(2, 3)})
    bad = vectors(2, 4)
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match="'<nan>' has 1 NaN/inf values of 64"):
        ours.load_textual_inversion({"<nan>": bad})
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(ValueError, match="empty.safetensors holds no embedding"):
        ours.load_textual_inversion(tmp_path / "empty.safetensors")
    with pytest.raises(ValueError, match=r"'<e>' is empty, shape \(0, 32\)"):
        ours.load_textual_inversion({"<e>": torch.zeros(0, E)})
    with pytest.raises(ValueError, match="holds an embedding with no name: pass token="):
        ours.load_textual_inversion({"emb_params": vectors(1, 5)})
    with pytest.raises(ValueError, match="a bare tensor holds no token name"):
        ours.load_textual_inversion(vectors(1, 5))
    with pytest.raises(ValueError, match="token 'two words' must be a non-empty string without spaces"):
        ours.load_textual_inversion(vectors(1, 5), token="two words")
    with pytest.raises(ValueError, match=r"expected floating-point \(E,\) or \(n, E\)"):
        ours.load_textual_inversion({"<i>": torch.ones(2, E, dtype=torch.long)})
    with pytest.raises(FileNotFoundError, match="neither learned_embeds.safetensors nor learned_embeds.bin"):
        ours.load_textual_inversion(tmp_path)
    assert list(ours.textual_inversions) == ["<b>", "<c>_1"]  # failed loads changed nothing
    ours.unload_textual_inversion()
    assert len(ours.tokenizer) == n and torch.equal(ours.text_encoder.get_input_embeddings().weight, weight)
