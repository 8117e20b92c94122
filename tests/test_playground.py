"""The playground: what `draw` keeps of a generation, and the widgets redrawing (no browser here:
tests/browser opens it in Chromium, served by `minisd playground`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minisd import StableDiffusion, cli, playground
from minisd.generate import takes_x0
from minisd.playground import Playground, Settings, draw, prompt_words
from minisd.shapes import course

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe():
    p = StableDiffusion.from_pretrained("tiny", device="cpu")
    p.progress = False
    return p


@pytest.fixture(scope="module")
def shown(pipe):
    """The workshop playground on the tiny model: the star LoRA and the edge ControlNet loaded."""
    pg = course.playground(pipe)
    yield pg
    pipe.unload_lora()
    pipe.unload_controlnet()


def test_draw_keeps_every_step_and_gives_the_pipelines_picture(pipe):
    settings = Settings("a red circle on the left", steps=6, seed=3)
    d = draw(pipe, settings)
    image = pipe(settings.prompt, num_inference_steps=6, seed=3, output_type="pt")[0]
    final = pipe(settings.prompt, num_inference_steps=6, seed=3, output_type="latent")[0]
    print(f"draw against pipe: max |picture diff| {(d.image - image).abs().max():.1e}, "
          f"max |latent diff| {(d.latents[-1] - final).abs().max():.1e}")
    # Capturing attention computes it the naive way (softmax(QKᵀ)V, not the fused kernel): float rounding apart,
    # which six steps grow to about 2e-4 in the latents (|z| ~ 3) on one thread, 3e-5 on two
    assert torch.allclose(d.image, image, atol=1e-4) and torch.allclose(d.latents[-1], final, atol=1e-3)
    assert len(d.latents) == len(d.x0) == len(d.maps) == len(d.timesteps) == 6
    assert d.timesteps == sorted(d.timesteps, reverse=True)


def test_the_guess_converges_on_the_picture(pipe):
    """x̂₀ at the first step is far from the final latents, at the last step close to them."""
    d = draw(pipe, Settings("a large blue square", steps=10, seed=0))
    gaps = [(x0 - d.latents[-1]).norm().item() / d.latents[-1].norm().item() for x0 in d.x0]
    print("relative distance of x̂₀ to the final latents, by step:", [round(g, 3) for g in gaps])
    assert gaps[0] > 0.2 and gaps[-1] < 0.05 and gaps[-1] < gaps[0] / 5


def test_attention_maps_are_distributions_over_tokens(pipe):
    """Each pixel's cross-attention sums to 1 over the 77 tokens, at every step; the maps are kept per step
    at the finest captured resolution, nothing else (the full matrices are dropped)."""
    d = draw(pipe, Settings("a red circle on the left", steps=4))
    h = pipe.image_size // pipe.vae.config.downsampling
    for m in d.maps:
        assert m.shape == (77, h, h)
        total = m.sum(0)
        assert torch.allclose(total, torch.ones_like(total), atol=1e-4), (total.min(), total.max())


def test_prompt_words(pipe):
    assert [w for _, w in prompt_words(pipe, "a red circle on the left")] == ["a", "red", "circle", "on", "the", "left"]
    assert [i for i, _ in prompt_words(pipe, "a red circle")] == [1, 2, 3]
    assert prompt_words(pipe, "") == []


def test_draw_refuses_a_switch_with_nothing_behind_it(pipe):
    with pytest.raises(ValueError, match="needs a LoRA"):
        draw(pipe, Settings("a red circle", lora_scale=1.0))
    with pytest.raises(ValueError, match="control_image"):
        draw(pipe, Settings("a red circle", control=True))


def test_a_callback_with_four_parameters_gets_x0():
    assert not takes_x0(lambda i, t, z: None)
    assert takes_x0(lambda i, t, z, x0: None) and takes_x0(lambda *args: None)


def test_changing_a_setting_draws_again_and_scrubbing_only_paints(shown):
    pg = shown
    c = pg.controls
    picture = lambda i: bytes(pg.views[i].value)
    first = picture(0)
    assert first.startswith(b"\x89PNG") and picture(1).startswith(b"\x89PNG")   # two prompts by default
    kept = len(pg.drawings)
    pg.step.value = 3
    assert picture(0) != first and len(pg.drawings) == kept, "scrubbing sampled again"
    c["seed"].value = 5
    assert len(pg.drawings) == kept + 2 and pg.last_seconds, "a new seed did not draw both prompts"
    c["seed"].value = 0
    assert pg.last_seconds == [] and "kept drawings" in pg.status.value   # going back: nothing sampled
    c["prompt_b"].value = ""
    assert picture(1) == b""
    c["prompt_b"].value = "a yellow star"


def test_the_switches_change_the_picture(shown):
    pg = shown
    c = pg.controls
    pg.step.value = pg.step.max
    plain = pg.drawings[pg.settings()[1]].image
    c["lora"].value = True
    starred = pg.drawings[pg.settings()[1]].image
    c["lora"].value = False
    c["control"].value = True
    steered = pg.drawings[pg.settings()[1]].image
    c["control"].value = False
    lora_change, control_change = (starred - plain).abs().mean().item(), (steered - plain).abs().mean().item()
    print(f"mean |picture change|: LoRA {lora_change:.3f}, ControlNet {control_change:.3f}")
    assert lora_change > 0.02 and control_change > 0.02
    assert pg.settings()[1].lora_scale == 0.0 and not pg.settings()[1].control


def test_steps_move_the_scrubber_with_them(shown):
    pg = shown
    pg.controls["steps"].value = 8
    assert pg.step.max == 8 and pg.step.value == 8
    pg.step.value = 2
    pg.controls["steps"].value = 12
    assert pg.step.max == 12 and pg.step.value == 2        # a chosen step stays chosen
    pg.controls["steps"].value = 20


def test_a_refused_setting_is_said_and_the_pictures_kept(shown, monkeypatch):
    pg = shown

    def refuse(*args, **kwargs):
        raise ValueError("this model cannot do that")

    monkeypatch.setattr(playground, "draw", refuse)
    before = bytes(pg.views[0].value)
    pg.controls["seed"].value = 99
    assert "ValueError: this model cannot do that" in pg.status.value and bytes(pg.views[0].value) == before
    monkeypatch.undo()
    pg.controls["seed"].value = 0


def test_snapshot_is_the_columns_side_by_side(shown):
    still = shown.snapshot()
    assert still.width > 2 * 3 * shown.tile and still.height > shown.tile


def test_committed_notebook_is_the_generated_one():
    """notebooks/playground.ipynb is `playground.notebook()`, executed: the same cells."""
    committed = json.loads((REPO / "notebooks" / "playground.ipynb").read_text())
    generated = playground.notebook()
    assert [(c["cell_type"], "".join(c["source"])) for c in committed["cells"]] == \
           [(c["cell_type"], "".join(c["source"])) for c in generated["cells"]]
    served = playground.notebook(still=False)["cells"]
    assert len(served) == len(generated["cells"]) - 1 and "snapshot" not in json.dumps(served)


@pytest.mark.parametrize("argv, says", [
    (["playground", "--model", "/no/such/model"], "neither a file, a folder"),
    (["playground", "--port", "0"], "--port"),
    (["playground", "--port", "70000"], "--port"),
])
def test_cli_refuses_bad_input_before_serving(argv, says, capsys, tmp_path):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


def test_cli_refuses_a_folder_that_is_no_pipeline(capsys, tmp_path):
    assert cli.main(["playground", "--model", str(tmp_path)]) == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_prompt_words_with_clips_bpe_tokenizer():
    from types import SimpleNamespace

    from minisd.models.tokenizer import Tokenizer

    clip = SimpleNamespace(tokenizer=Tokenizer.clip_vit_l())
    words = prompt_words(clip, "a photograph of an astronaut riding a horse")
    assert [w for _, w in words] == ["a", "photograph", "of", "an", "astronaut", "riding", "a", "horse"]


def test_playground_on_the_sd15_layout(tiny_pipe):
    """The same playground on a model in SD 1.5's exact block layout (random weights, 64 px): four
    resolution levels, attention maps at the finest (the 8×8 latents)."""
    pg = Playground(tiny_pipe, ("a red circle on the left", "a blue square"), steps=3, tile=64)
    d = pg.drawings[pg.settings()[0]]
    assert len(d.latents) == 3 and d.maps[0].shape == (77, 8, 8)
    assert all(bytes(v.value).startswith(b"\x89PNG") for v in pg.views)
