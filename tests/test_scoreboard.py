"""`minisd eval --fid` and the scoreboard (minisd.shapes.scoreboard), on the random-weight test model:
the numbers are not the point here, the plumbing is — renders against themselves give FID 0, a random
model is farther from the renders than the floor, careless flags are refused, the scoreboard resumes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from minisd import cli
from minisd.metrics import frechet_distance
from minisd.shapes import scoreboard as sb
from minisd.shapes.analyser import eval_prompts, generate_for
from minisd.shapes.analyser import main as eval_main
from minisd.shapes.features import features
from minisd.shapes.sweeps import picture_records

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
PROMPTS = eval_prompts()[::10]  # --quick's 24: 18 one-object prompts (a third naming the background), 6 two-object
FAST = {"epsilon": [("ddim", 1, 1.0), ("ddim", 2, 7.5)]}


def run_cli(argv: list) -> int:
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def test_renders_against_themselves_give_fid_zero():
    real = features(sb.renders(sb.cycled(PROMPTS, 60), sb.REAL_SEED))
    assert frechet_distance(real, real) < 1e-6
    assert sb.distances(real, real)["FID"] < 1e-6
    # a second set of renders of the same prompts (other seeds: other jitter, other unnamed attributes)
    # is close but not the same set
    _, floor = sb.reference(sb.cycled(PROMPTS, 60))
    assert 1e-6 < floor["FID"] and floor["N"] == 60


def test_a_random_model_is_farther_from_the_renders_than_the_floor(tiny_pipe):
    tiny_pipe.progress = False
    rows = sb.fid_table(tiny_pipe, 50, [1.0], steps=1, sampler=None)
    assert list(rows) == ["CFG 1", "floor: renders vs renders"]
    model, floor = rows["CFG 1"], rows["floor: renders vs renders"]
    assert model["N"] == floor["N"] == 50
    assert model["FID"] > 10 * floor["FID"], rows
    assert model["KID"] > floor["KID"] + 3 * max(model["KID std"], floor["KID std"]), rows
    assert model["seconds per image"] > 0 and floor["seconds per image"] is None


def test_eval_fid_through_the_cli(tiny_folder, tmp_path, capsys):
    out = tmp_path / "fid.json"
    assert run_cli(["eval", "--fid", "--fid-n", "50", "--model", tiny_folder, "--cfg", "1", "--steps", "1",
                    "--json", out]) == 0
    printed = capsys.readouterr().out
    assert "FID and KID on 50 pictures" in printed and "ddim, 1 steps" in printed  # the model's own sampler
    assert "| pictures | N | FID | KID | KID std | seconds per image |" in printed
    assert "| floor: renders vs renders | 50 |" in printed
    saved = json.loads(out.read_text())
    assert saved["CFG 1"]["FID"] > saved["floor: renders vs renders"]["FID"]


@pytest.mark.parametrize("n", ["49", "0", "-5"])
def test_a_bad_fid_n_is_refused_in_one_line(n, capsys):
    assert run_cli(["eval", "--fid", "--fid-n", n]) == 2
    err = capsys.readouterr().err
    assert "--fid-n" in err and f"got {n}" in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_fid_is_a_separate_evaluation_and_needs_the_features(capsys):
    assert run_cli(["eval", "--fid", "--vae"]) == 2
    assert "separate evaluations" in capsys.readouterr().err
    with pytest.raises(ValueError, match="minisd eval --fid"):
        eval_main(["--fid", "--fid-n", "50"])  # without the features passed in (the CLI passes them)


def test_records_of_made_pictures_are_picture_records(tiny_pipe):
    tiny_pipe.progress = False
    prompts = [PROMPTS[0], PROMPTS[-1]]  # one object with a background, two objects
    images = generate_for(tiny_pipe, prompts, 1.0, 1, seed=1000)
    assert sb.records_of(prompts, images, 1000) == picture_records(tiny_pipe, prompts, (1000,), guidance_scale=1.0,
                                                                  steps=1)


def test_model_kind_reads_the_scheduler_and_the_training_record(tiny_pipe, tiny_folder, tmp_path):
    assert sb.model_kind(tiny_folder, tiny_pipe) == "epsilon"
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "LCMScheduler"}))
    assert sb.model_kind(tmp_path, tiny_pipe) == "lcm"
    assert {s for s, _, _ in sb.SETTINGS["lcm"]} == {"lcm"} and {s for s, _, _ in sb.SETTINGS["flow"]} == {"flow_euler"}
    assert (sb.passes(tiny_pipe, 7.5), sb.passes(tiny_pipe, 1.0)) == (2, 1)
    student = SimpleNamespace(backbone=SimpleNamespace(config=SimpleNamespace(time_cond_proj_dim=256)))
    assert sb.model_kind(tmp_path / "no folder", student) == "lcm"  # reads the guidance scale as an input:
    assert sb.passes(student, 7.5) == 1                              # one pass a step, no CFG


def test_the_scoreboard_writes_resumes_and_tabulates(tiny_folder, tmp_path, capsys):
    out = tmp_path / "board.json"
    board = sb.run([tiny_folder], draws=1, prompts=PROMPTS, out=out, settings={"epsilon": FAST["epsilon"][:1]})
    name = Path(tiny_folder).name
    first = f"{name} / ddim 1"
    assert list(json.loads(out.read_text())["entries"]) == [first]
    e = board["entries"][first]
    assert e["NFE"] == 1 and e["guidance_scale"] == 1.0 and e["N"] == 24 and e["threads"] >= 1
    assert set(e["adherence"]) == set(sb.FACTORS)
    for rate, low, high, judged in e["adherence"].values():
        assert 0 <= low <= rate <= high <= 1 and judged > 0
    assert e["adherence"]["both"][3] == 6 and e["adherence"]["colour"][3] == 18

    saved = json.loads(out.read_text())  # resume: what is there is kept, not recomputed
    saved["entries"][first]["FID"] = -1.0
    out.write_text(json.dumps(saved))
    board = sb.run([tiny_folder], draws=1, prompts=PROMPTS, out=out, settings=FAST)
    second = f"{name} / ddim 2"
    assert list(board["entries"]) == [first, second] and board["entries"][first]["FID"] == -1.0
    assert board["entries"][second]["NFE"] == 4  # 2 steps, two U-Net passes each under CFG 7.5
    assert json.loads(out.read_text()) == json.loads(json.dumps(board))
    assert [p.name for p in tmp_path.iterdir()] == ["board.json"]  # no temporary file left behind

    lines = sb.format_board(board).splitlines()
    assert lines[0].startswith("N = 24 pictures (24 prompts × 1 draws)")
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["model", "sampler", "steps", "NFE", "CFG", "colour", "shape", "position", "size",
                      "background", "two objects: both", "FID", "KID", "s/image (threads)"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:]]
    assert [r[:5] for r in rows] == [[name, "ddim", "1", "1", "1"], [name, "ddim", "2", "4", "7.5"]]
    assert all(len(r) == len(header) for r in rows)

    with pytest.raises(ValueError, match="--fresh"):  # other settings cannot stand beside these numbers
        sb.run([tiny_folder], draws=2, prompts=PROMPTS, out=out, settings=FAST)
    board = sb.run([tiny_folder], draws=1, prompts=PROMPTS, out=out, settings={"epsilon": FAST["epsilon"][:1]},
                   fresh=True)
    assert list(board["entries"]) == [first] and board["entries"][first]["FID"] >= 0


def test_the_benchmark_script_runs_quick(tiny_folder, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_scoreboard", BENCH / "scoreboard.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sb, "SETTINGS", {"epsilon": FAST["epsilon"][:1]})
    board = bench.main(["--quick", "--models", str(tiny_folder), "--out", str(tmp_path / "q.json")])
    assert board["settings"]["prompts"] == 24 and board["settings"]["seeds"] == [0]
    assert "| model | sampler | steps | NFE |" in capsys.readouterr().out


def test_the_docs_table_is_the_committed_scoreboard():
    """docs/shapes_world.md quotes docs/results/scoreboard.json row for row, as `format_board` prints it."""
    from minisd.shapes.scoreboard import OUT, format_board

    doc = (OUT.parent.parent / "shapes_world.md").read_text()
    table = format_board(json.loads(OUT.read_text()))
    missing = [line for line in table.splitlines() if line.startswith("| tiny") and line not in doc]
    assert not missing, f"docs/shapes_world.md lacks {len(missing)} scoreboard rows, e.g. {missing[0]}"


def test_the_lcm_from_the_v_model_meets_the_few_step_goal():
    """The goal: an LCM at 4 steps within 5 points of the ε model at 25 steps on every factor. The committed
    scoreboard's data/tiny_lcm_v rows, as docs/shapes_world.md states them; the LCM from the ε model misses it."""
    from minisd.shapes.scoreboard import OUT

    entries = json.loads(OUT.read_text())["entries"]
    ref = entries["tiny / ddim 25"]
    gap = lambda key, f: 100 * (entries[key]["adherence"][f][0] - ref["adherence"][f][0])  # noqa: E731
    one_object = ("colour", "shape", "position", "size", "background")
    assert all(gap("tiny_lcm_v / lcm 4", f) >= -5 for f in (*one_object, "both"))
    assert all(gap("tiny_lcm_v / lcm 2", f) >= -5 for f in (*one_object, "both"))
    assert not all(gap("tiny_lcm / lcm 4", f) >= -5 for f in one_object)
    doc = (OUT.parent.parent / "shapes_world.md").read_text()
    worst = -min(gap("tiny_lcm_v / lcm 4", f) for f in one_object)
    both = [round(100 * entries[k]["adherence"]["both"][0]) for k in ("tiny_lcm_v / lcm 4", "tiny / ddim 25")]
    fid = [round(entries[k]["FID"], 2) for k in ("tiny_lcm_v / lcm 4", "tiny / ddim 25")]
    assert f"is at most {worst:.1f} points under the ε" in doc
    assert f"ahead on two objects ({both[0]}%\n  against {both[1]}%); FID {fid[0]:.2f} against {fid[1]:.2f}" in doc
