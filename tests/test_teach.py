"""Teaching a concept: `minisd train textual-inversion` learns only its token's vectors and saves them in the
layouts `load_textual_inversion` reads; `minisd train dreambooth` fine-tunes the U-Net alone, draws its prior
with the frozen base model (once: a resumed run reuses it) and saves a whole pipeline folder; `minisd train
dreambooth-lora` trains a LoRA on the same data and prior; the head-to-head rates count what they say."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEST

from minisd import StableDiffusion
from minisd.shapes import concept_eval
from minisd.shapes.finetune import main as finetune_main
from minisd.shapes.train_ti import with_token, word_id

COMMON = ["--n-images", "24", "--steps", "3", "--batch", "4"]


def test_textual_inversion_moves_only_its_token_and_saves_both_layouts(tiny_folder, tmp_path):
    out = finetune_main(["textual-inversion", "--model", str(tiny_folder), *COMMON, "--num-vectors", "2",
                         "--lr", "0.05", "--warmup", "1", "--out", str(tmp_path / "emb"), "--work", str(tmp_path / "w")])
    base = StableDiffusion.from_pretrained(tiny_folder, device="cpu")
    start = base.text_encoder.get_input_embeddings().weight[word_id(base.tokenizer, "triangle")].detach()
    n = len(base.tokenizer)
    token = base.load_textual_inversion(out)
    assert token == "<star>" and base.tokenizer.expand_multi_vector("a <star>") == "a <star> <star>_1"
    vectors = base.textual_inversions[token].vectors
    assert vectors.shape == (2, TEST.text_encoder.hidden_size)
    moved = (vectors - start).norm(dim=-1)
    assert (moved > 1e-3).all(), f"the vectors did not move from 'triangle': {moved}"
    base.unload_textual_inversion()
    a1111 = base.load_textual_inversion(out / "emb.pt")  # the A1111 file names its token inside
    assert a1111 == "<star>" and torch.equal(base.textual_inversions[a1111].vectors, vectors)
    record = json.loads((out / "training.json").read_text())
    assert record["command"] == "minisd train textual-inversion" and record["minutes"]["seconds_per_step"] > 0
    # the trained embedding (the checkpoint's): every row but the token's two is exactly the base model's
    trained = torch.load(tmp_path / "w" / "textual-inversion.pt", weights_only=True)["embedding"]["weight"]
    assert trained.shape[0] == n + 2 and torch.equal(trained[n:], vectors)
    assert torch.equal(trained[:n], base.text_encoder.get_input_embeddings().weight[:n])


def test_textual_inversion_captions_and_a_bad_init_word():
    assert with_token("a small red star on the left and a blue star", "star") == \
        "a small red <star> on the left and a blue <star>"
    assert with_token("a starfish", "star") == "a starfish"  # whole words only


def test_textual_inversion_refuses_an_init_word_outside_the_vocabulary(tiny_folder, tmp_path):
    with pytest.raises(ValueError, match=r"^--init-word must be one word of the tokenizer's vocabulary, got 'hexagon'$"):
        finetune_main(["textual-inversion", "--model", str(tiny_folder), *COMMON, "--init-word", "hexagon",
                       "--out", str(tmp_path / "emb"), "--work", str(tmp_path / "w")])
    assert not (tmp_path / "emb").exists()


def test_dreambooth_trains_the_unet_alone_and_keeps_its_prior(tiny_folder, tmp_path):
    work = tmp_path / "w"
    argv = ["dreambooth", "--model", str(tiny_folder), *COMMON, "--n-class-images", "4", "--work", str(work)]
    out = finetune_main([*argv, "--out", str(tmp_path / "db")])
    base, tuned = (StableDiffusion.from_pretrained(f, device="cpu") for f in (tiny_folder, out))
    assert tuned.unet.conv_in.weight.dtype == torch.float32  # loaded as fp32; the files are fp16
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    changed = [n for n, p in tuned.unet.state_dict().items()
               if not torch.allclose(p, base.unet.state_dict()[n].half().float())]
    assert len(changed) > len(base.unet.state_dict()) // 2, "the U-Net was not trained"
    for name in ("vae", "text_encoder"):  # frozen: the same weights (after the fp16 round trip)
        for k, v in getattr(tuned, name).state_dict().items():
            assert torch.equal(v, getattr(base, name).state_dict()[k].half().float()), f"{name}.{k} changed"
    log = (work / "log.txt").read_text()
    assert "prior: 4 pictures drawn by the base model" in log and "batch 2 of star + 2 of the prior, λ = 1" in log
    prior = torch.load(work / "prior.pt", weights_only=True)
    assert prior["latents"].shape == (4, 4, TEST.unet.sample_size, TEST.unet.sample_size)
    assert len(prior["captions"].split("\n")) == 4 and "star" not in prior["captions"]
    finetune_main([*argv, "--steps", "4", "--out", str(tmp_path / "db2")])  # resumes at step 3, the prior read back
    assert "prior: 4 pictures of the base model read from" in (work / "log.txt").read_text()


def test_dreambooth_without_prior_draws_no_prior(tiny_folder, tmp_path):
    finetune_main(["dreambooth", "--model", str(tiny_folder), *COMMON, "--prior-loss-weight", "0",
                   "--out", str(tmp_path / "db"), "--work", str(tmp_path / "w")])
    log = (tmp_path / "w" / "log.txt").read_text()
    assert "batch 4 of star + 0 of the prior, λ = 0" in log and "prior:" not in log
    assert not (tmp_path / "w" / "prior.pt").exists()


def test_dreambooth_lora_trains_a_lora_with_dreambooths_prior_on_the_frozen_unet(tiny_folder, tmp_path):
    """`minisd train dreambooth-lora`: DreamBooth's data and prior, the LoRA's low-rank updates; the U-Net is not
    touched, and the result is a LoRA in both layouts that `load_lora` reads and that changes the picture."""
    work = tmp_path / "w"
    argv = ["dreambooth-lora", "--model", str(tiny_folder), *COMMON, "--n-class-images", "4", "--rank", "4",
            "--alpha", "4", "--lr", "0.01", "--warmup", "1", "--work", str(work)]
    out = finetune_main([*argv, "--out", str(tmp_path / "dbl")])
    assert sorted(f.name for f in out.glob("*.safetensors")) == ["dbl_kohya.safetensors", "pytorch_lora_weights.safetensors"]
    log = (work / "log.txt").read_text()
    assert "prior: 4 pictures drawn by the base model" in log
    assert "dreambooth-lora: LoRA trained; batch 2 of star + 2 of the prior, λ = 1" in log
    checkpoint = torch.load(work / "dreambooth-lora.pt", weights_only=True)["model"]
    assert checkpoint and all(k.endswith(("down.weight", "up.weight")) for k in checkpoint), "only LoRA weights train"
    pipe = StableDiffusion.from_pretrained(tiny_folder, device="cpu")
    pipe.progress = False
    before = pipe("a small red star on the left", num_inference_steps=2, seed=0, output_type="latent")
    pipe.load_lora(out, name="star")
    after = pipe("a small red star on the left", num_inference_steps=2, seed=0, output_type="latent")
    assert (after - before).abs().max() > 1e-4, "the saved LoRA changes nothing"
    pipe.unload_lora("star")
    pipe.load_lora(out / "dbl_kohya.safetensors", name="star")  # the kohya file: the same pictures
    kohya = pipe("a small red star on the left", num_inference_steps=2, seed=0, output_type="latent")
    assert (kohya - after).abs().max() < 1e-5
    assert json.loads((out / "training.json").read_text())["command"] == "minisd train dreambooth-lora"
    finetune_main([*argv, "--steps", "4", "--out", str(tmp_path / "dbl2")])  # resumes at step 3, the prior read back
    assert "prior: 4 pictures of the base model read from" in (work / "log.txt").read_text()


@pytest.mark.parametrize("argv, message", [
    (["textual-inversion", "--num-vectors", "0"], "--num-vectors must be at least 1, got 0"),
    (["dreambooth", "--prior-loss-weight", "-1"], "--prior-loss-weight must be a number >= 0, got -1.0"),
    (["dreambooth", "--n-class-images", "0"], "--n-class-images must be at least 1, got 0"),
    (["dreambooth", "--batch", "1"], "--batch must be at least 2 with prior preservation (half concept, half prior)"),
    (["dreambooth-lora", "--batch", "1"], "--batch must be at least 2 with prior preservation (half concept, half prior)"),
])
def test_careless_teaching_flags_are_refused_before_any_work(argv, message, tmp_path):
    with pytest.raises(ValueError) as info:
        finetune_main([*argv, "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not (tmp_path / "w").exists()


def test_rates_split_small_and_large_and_count_every_draw(monkeypatch):
    """`rates` judges what was asked (the plain word) while the model is told `word`, per size, over draws."""
    told = []

    def fake_generate(pipe, prompts, guidance_scale, steps, seed=0):
        told.extend(prompts)
        from minisd.shapes.analyser import render_prompt
        # the concept's prompts drawn as circles (wrong shape, right colour and place), base ones right
        return [render_prompt(p.replace("<star>", "circle"), seed=i) for i, p in enumerate(prompts)]

    monkeypatch.setattr(concept_eval, "generate_for", fake_generate)
    r = concept_eval.rates(None, word="<star>", draws=2)
    assert r["star shape, small"]["n"] == r["star shape, large"]["n"] == 60 and r["base shapes kept"]["n"] == 120
    assert r["star shape, small"]["rate"] == r["star shape, large"]["rate"] == 0.0
    assert r["star colour"]["rate"] == 1.0 and r["base shapes kept"]["rate"] == 1.0
    assert r["star shape, small"]["high"] > 0  # Wilson: 0 of 60 is not "certainly 0"
    assert sum("<star>" in p for p in told) == 120 and not any(" star" in p for p in told)


def test_the_priors_outline_weights_average_one_and_sit_on_outlines():
    """DreamBooth's prior pictures are weighted onto their outlines (as the LoRA's ordinary half): a flat picture
    gets weight 1 everywhere, a square more on its edge than in its middle or far from it."""
    from types import SimpleNamespace

    from minisd.shapes import world
    from minisd.shapes.train_dreambooth import outline_weights

    scene = world.Scene("white", [world.ShapeObject("blue", "square", "large", "center", (32.0, 32.0))])
    pictures = torch.stack([world.to_tensor(world.render(scene)), torch.zeros(3, 64, 64)])
    # a stand-in pipeline whose VAE decodes the latents to these pictures (16×16 latents, f = 4)
    vae = SimpleNamespace(scaling_factor=1.0, decode=lambda z: pictures[: len(z)])
    w = outline_weights(SimpleNamespace(vae=vae, device=torch.device("cpu")), torch.zeros(2, 4, 16, 16), 100.0)[:, 0]
    assert w.shape == (2, 16, 16) and torch.allclose(w.mean(dim=(1, 2)), torch.ones(2))
    assert torch.allclose(w[1], torch.ones(16, 16))  # no outline: the plain loss
    edge, middle, corner = w[0, 8, 4], w[0, 8, 8], w[0, 0, 0]  # the square spans pixels 18-46: cells 4.5-11.5
    assert edge > 5 * middle and edge > 5 * corner and torch.isclose(middle, corner)


def test_the_documented_head_to_head_is_the_measured_one():
    """docs/adapters.md shows benchmarks/concepts.py's table of docs/results/concepts.json, as it renders it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "docs" / "results" / "concepts.json").read_text())
    assert set(result["rows"]) == {"base model", "textual inversion", "LoRA", "DreamBooth", "DreamBooth, no prior",
                                   "DreamBooth-LoRA"}
    assert set(result["training"]["kinds"]) == {"textual-inversion", "lora", "dreambooth", "dreambooth, no prior",
                                                "dreambooth-lora"}
    assert result["draws"] >= 3 and all(r["n"] == 30 * result["draws"] for row in result["rows"].values()
                                        for k, r in row["rates"].items() if k.startswith("star shape"))
    doc = (root / "docs" / "adapters.md").read_text()
    shown = doc.split("<!-- concepts table")[1].split("-->", 1)[1].split("<!-- end concepts table -->")[0].strip()
    assert shown == concept_eval.markdown_table(result)


def test_the_shipped_dreambooth_lora_is_one_lora_in_two_layouts_made_as_recorded():
    """data/tiny_star_dreambooth_lora: its PEFT and kohya files attach the same updates to the same layers, and
    its training.json records `minisd train dreambooth-lora` at the defaults the head-to-head describes."""
    from minisd.pipeline import DATA
    from minisd.shapes.finetune import AdapterConfig

    folder = DATA / "tiny_star_dreambooth_lora"
    record = json.loads((folder / "training.json").read_text())
    assert record["command"] == "minisd train dreambooth-lora"
    shipped = AdapterConfig.of("dreambooth-lora")
    for key in ("steps", "batch", "lr", "rank", "targets", "prior_loss_weight", "n_class_images", "notch_weight"):
        assert record["config"][key] == getattr(shipped, key), key
    pipe = StableDiffusion.from_pretrained(DATA / "tiny", device="cpu")
    pipe.load_lora(folder, name="peft")
    peft = {k: (v.down.weight.clone(), v.up.weight.clone()) for k, v in pipe.loras["peft"].items()}
    pipe.unload_lora("peft")
    pipe.load_lora(folder / "tiny_star_dreambooth_lora_kohya.safetensors", name="kohya")
    kohya = {k: (v.down.weight, v.up.weight) for k, v in pipe.loras["kohya"].items()}
    assert len(peft) == 132 and set(peft) == set(kohya)
    assert all(torch.equal(peft[k][0], kohya[k][0]) and torch.equal(peft[k][1], kohya[k][1]) for k in peft)
    with pytest.raises(ValueError, match=r"no model_index.json\) — it holds a LoRA: attach it to a model with "
                                         r"load_lora \(--lora\)$"):
        StableDiffusion.from_pretrained(folder)  # a LoRA taken for a DreamBooth model: the line says what it is


def test_a_python_caller_gets_the_kinds_defaults():
    """AdapterConfig.of(kind) starts where `minisd train <kind>` does, not from the LoRA's defaults."""
    from minisd.shapes.finetune import AdapterConfig

    ti = AdapterConfig.of("textual-inversion", steps=30)
    assert (ti.lr, ti.caption_dropout, ti.steps) == (5e-3, 0.0, 30)
    assert AdapterConfig.of("dreambooth").lr == 1e-4 and AdapterConfig.of("lora") == AdapterConfig()
    dbl = AdapterConfig.of("dreambooth-lora")  # the LoRA's rate, rank and layers; DreamBooth's prior
    assert (dbl.lr, dbl.rank, dbl.targets, dbl.prior_loss_weight) == (1e-3, 64, AdapterConfig().targets, 1.0)
    with pytest.raises(ValueError, match="^kind must be one of lora, controlnet, inpaint, textual-inversion, "
                                         "dreambooth, dreambooth-lora, got 'hypernetwork'$"):
        AdapterConfig.of("hypernetwork")


def test_the_head_to_head_remeasures_only_the_rows_asked(tmp_path, monkeypatch):
    """`benchmarks/concepts.py --only ROW` measures ROW and keeps the JSON's other rows' rates; draws that differ
    from the JSON's, or a row the JSON lacks, are refused before any picture is drawn."""
    import importlib.util
    import shutil
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    spec = importlib.util.spec_from_file_location("bench_concepts", bench_dir / "concepts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    asked = []

    def fake_rates(pipe, word, draws, drawn):
        asked.append(word)
        drawn["star"] += 1
        return {"star shape, small": concept_eval.rate([True, False] * draws)}

    monkeypatch.setattr(bench, "rates", fake_rates)
    path = tmp_path / "concepts.json"
    shutil.copy(bench_dir.parent / "docs" / "results" / "concepts.json", path)
    old = json.loads(path.read_text())
    result = bench.main(["--only", "DreamBooth-LoRA", "--json", str(path)])
    assert asked == ["star"] and result["measured"] == ["DreamBooth-LoRA"]
    assert result["rows"]["DreamBooth-LoRA"]["rates"]["star shape, small"]["rate"] == 0.5
    for name, row in old["rows"].items():
        if name != "DreamBooth-LoRA":
            assert result["rows"][name]["rates"] == row["rates"], name
    assert json.loads(path.read_text()) == result
    with pytest.raises(SystemExit, match="measured with 3 draws, not --draws 1"):
        bench.main(["--only", "LoRA", "--json", str(path), "--draws", "1"])
    del old["rows"]["LoRA"]
    path.write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="has no row 'LoRA' to keep; measure it too"):
        bench.main(["--only", "DreamBooth-LoRA", "--json", str(path)])
    assert len(asked) == 1
