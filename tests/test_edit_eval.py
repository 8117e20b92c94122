"""The edit evaluation (minisd.shapes.edit_eval): held-out pictures, the swapped prompts, the verdicts, the
inversion's round trip, and `minisd eval --edit`."""

from __future__ import annotations

import inspect
import json
from collections import Counter

import pytest
import torch

from minisd import StableDiffusion
from minisd.pipeline import DATA
from minisd.shapes import edit_eval as ee
from minisd.shapes import world
from minisd.shapes.analyser import main as eval_main
from minisd.shapes.analyser import render_prompt


@pytest.fixture(scope="module")
def tiny():
    pipe = StableDiffusion.from_pretrained("tiny", device="cpu", dtype=torch.float32)
    pipe.progress = False
    return pipe


# ─── the tasks ─────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("caption, old, new, expected", [
    ("a red circle", "red", "blue", "a blue circle"),
    ("an orange circle on the left", "orange", "green", "a green circle on the left"),
    ("a blue square at the top on a black background", "blue", "orange", "an orange square at the top on a black background"),
    ("a large orange triangle", "triangle", "circle", "a large orange circle"),
])
def test_swap_word_keeps_the_sentence_and_the_article_agrees(caption, old, new, expected):
    assert ee.swap_word(caption, old, new) == expected


def test_swapped_prompts_have_as_many_tokens(tiny):
    from minisd.editing import token_count

    for task in ee.edit_tasks(30):
        assert token_count(tiny, task.prompt) == token_count(tiny, task.target), task


def test_swap_word_refuses_a_word_not_in_the_caption():
    with pytest.raises(ValueError, match="'green' exactly once in 'a red circle'"):
        ee.swap_word("a red circle", "green", "blue")


def test_tasks_are_held_out_one_object_pictures_with_one_word_swapped():
    tasks = ee.edit_tasks(60)
    assert len(tasks) == 120 and Counter(t.kind for t in tasks) == {"colour": 60, "shape": 60}
    for i, task in enumerate(tasks):
        scene = world.make_scene(ee.SEED + i // 2, world.BASE_SHAPES, p_two=0.0)
        assert task.prompt == scene.caption and len(task.scene.objects) == 1
        obj = task.scene.objects[0]
        assert task.old == (obj.colour if task.kind == "colour" else obj.shape) and task.new != task.old
        assert task.target == ee.swap_word(task.prompt, task.old, task.new)
        assert task.new in (world.COLOURS if task.kind == "colour" else world.BASE_SHAPES)  # never a star
    config = json.loads((DATA / "tiny" / "training.json").read_text())["config"]
    assert config["seed"] * 10_000_000 + config["n_images"] <= ee.SEED  # the shipped model never saw these scenes
    assert {t.new for t in tasks if t.kind == "colour"} == set(world.COLOURS)
    assert Counter(t.new for t in tasks if t.kind == "shape").keys() == set(world.BASE_SHAPES)


def test_the_evaluation_edits_with_pipe_edits_defaults(tiny):
    defaults = inspect.signature(tiny.edit).parameters
    assert (defaults["cross_replace"].default, defaults["self_replace"].default,
            defaults["guidance_scale"].default) == (ee.CROSS, ee.SELF, ee.GUIDANCE)


def test_bad_picture_counts_are_refused():
    for n in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            ee.edit_tasks(n)


# ─── the verdicts ──────────────────────────────────────────────────────────────────────────────────

def test_verdict_passes_the_wanted_picture_and_fails_the_unedited_one():
    for task in ee.edit_tasks(6):
        right = render_prompt(task.wanted(), seed=1)
        assert ee.verdict(task, right)["success"], task
        unedited = ee.verdict(task, task.image)
        assert not unedited["new word"] and not unedited["success"], task


def test_verdict_fails_an_edit_that_moves_or_reshapes_the_object():
    task = next(t for t in ee.edit_tasks(10) if t.kind == "colour" and t.scene.objects[0].position != "center")
    obj = task.scene.objects[0]
    moved = render_prompt(f"a {obj.size} {task.new} {obj.shape} in the center on a {task.scene.background} background")
    v = ee.verdict(task, moved)
    assert v["new word"] and not v["position kept"] and not v["success"]
    other = next(s for s in world.BASE_SHAPES if s != obj.shape)
    reshaped = render_prompt(task.wanted().replace(f" {obj.shape} ", f" {other} "))
    v = ee.verdict(task, reshaped)
    assert v["new word"] and not v["shape kept"] and not v["success"]


def test_summarise_counts_each_kind_with_its_interval():
    tasks = ee.edit_tasks(4)
    verdicts = [{"new word": True, "success": i != 2} for i in range(len(tasks))]  # task 2, a colour swap, fails
    s = ee.summarise(tasks, verdicts)
    assert s["colour"]["success"]["rate"] == 0.75 and s["colour"]["success"]["n"] == 4
    assert s["shape"]["success"]["rate"] == 1.0
    assert 0 < s["colour"]["success"]["low"] < 0.75 < s["colour"]["success"]["high"] < 1


# ─── on the shipped model ──────────────────────────────────────────────────────────────────────────

def test_inversion_round_trip_and_what_guidance_does_to_it(tiny):
    """Measured (25 steps, 1 thread) on held-out picture 2, 'a green square on the right': 1.29 levels at
    guidance 1 (VAE floor 1.17); redrawn at 7.5 from the same z_T 3.98; inverted and redrawn at 7.5, 9.15;
    at 7.5 with the prompt as the negative prompt, the guidance-1 round trip again."""
    task = ee.edit_tasks(3)[4]
    redraw = lambda g, g_inv=1.0, negative=None: ee.reconstruction(tiny, task.image, task.prompt, 25, g, g_inv, negative)
    plain, guided, inverted_guided = redraw(1.0), redraw(7.5), redraw(7.5, 7.5)
    negative = redraw(7.5, 1.0, task.prompt)
    print(f"[edit_eval] {task.prompt!r}: guidance 1 {plain['error']:.2f} levels (floor {plain['vae floor']:.2f}), "
          f"7.5 {guided['error']:.2f}, inverted at 7.5 {inverted_guided['error']:.2f}, "
          f"the prompt as negative {negative['error']:.2f}")
    assert plain["error"] <= plain["vae floor"] + 0.5
    assert guided["error"] > 2 * plain["error"] and inverted_guided["error"] > 2 * guided["error"]
    assert abs(negative["error"] - plain["error"]) < 0.05


def test_a_colour_swap_on_the_shipped_model(tiny):
    task = ee.edit_tasks(1)[0]
    image = ee.run_edits(tiny, [task], steps=25)[0]
    v = ee.verdict(task, image)
    print(f"[edit_eval] {task}: {v}")
    assert v["success"] and v["old colour gone"], v


def test_minisd_eval_edit_writes_json(tmp_path, capsys):
    out = tmp_path / "edit.json"
    calls = []

    def editing(pipe, steps, seed, limit):
        calls.append((steps, seed, limit))
        return {"colour swap": {"success": 0.5}, "shape swap": {"success": 0.25}}

    results = eval_main(["--edit", "--steps", "7", "--seed", "3", "--limit", "10", "--json", str(out)], editing=editing)
    assert calls == [(7, 3, 10)] and results["shape swap"]["success"] == 0.25
    assert '"colour swap"' in out.read_text() and "| colour swap | 50% |" in capsys.readouterr().out


def test_minisd_eval_edit_refuses_other_modes_and_a_missing_callback():
    with pytest.raises(ValueError, match="--vae and --edit are separate evaluations"):
        eval_main(["--edit", "--vae"], editing=lambda *a: {})
    with pytest.raises(ValueError, match="--edit needs edit_eval"):
        eval_main(["--edit"])


def test_the_documented_numbers_are_the_measured_ones():
    """docs/editing.md's two tables are docs/results/editing.json (benchmarks/editing.py), as rounded there."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "docs" / "results" / "editing.json").read_text())
    doc = (root / "docs" / "editing.md").read_text()
    rows = dict(zip(["guidance 1", "VAE round trip", "guidance 7.5, z_T inverted at 1",
                     "guidance 7.5, z_T inverted at 7.5", "guidance 7.5, caption as negative prompt",
                     "guidance 7.5, null-text inversion"],
                    ["guidance 1 (the round trip)", "the VAE alone (encode, decode)", "guidance 7.5 from the same z_T",
                     "guidance 7.5 from z_T inverted at 7.5", "guidance 7.5, the caption as negative prompt",
                     "guidance 7.5, null-text inversion"]))
    for key, label in rows.items():
        error = result["inversion"]["levels of 255"][key]
        assert f"| {label} | {error['mean']:.2f} | {error['max']:.2f} |" in doc, label

    def cell(r: dict, bold: bool) -> str:
        rate = f"{100 * r['rate']:.0f}%"
        return f"{f'**{rate}**' if bold else rate} ({100 * r['low']:.0f}–{100 * r['high']:.0f}%)"

    for key, label, bold in (("edit", "`pipe.edit` (attention swapped)", True),
                             ("no attention swap", "same z_T, no attention swap", False)):
        rates = result[key]["rates"]
        assert f"| {label} | {cell(rates['colour']['success'], bold)} | {cell(rates['shape']['success'], bold)} |" in doc
    pct = lambda key, kind, what: f"{100 * result[key]['rates'][kind][what]['rate']:.0f}%"  # noqa: E731
    assert f"keep the shape ({pct('edit', 'colour', 'shape kept')} against " \
           f"{pct('no attention swap', 'colour', 'shape kept')})" in doc
    assert f"the new shape drawn in {pct('edit', 'shape', 'new word')} against " \
           f"{pct('no attention swap', 'shape', 'new word')}" in doc
    null, plain = "edit, null-text inversion", "edit, plain inversion, same pictures"
    assert f"on the first {result[null]['settings']['pictures']} held-out pictures" in doc
    assert f"colour swaps succeeded in {pct(null, 'colour', 'success')} and shape swaps in " \
           f"{pct(null, 'shape', 'success')}, against {pct(plain, 'colour', 'success')} and " \
           f"{pct(plain, 'shape', 'success')} with the plain inversion" in doc
