"""The mean-brightness test (minisd.shapes.brightness): the nudged noise, the direction, the prompts, and the
documented numbers against docs/results/brightness.json (benchmarks/brightness.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minisd import StableDiffusion
from minisd.shapes import analyser, brightness

ROOT = Path(__file__).resolve().parent.parent


def test_nudged_noise_moves_only_the_channel_means():
    unit = torch.tensor([0.6, -0.8, 0.0, 0.0])
    plain = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(7))
    for k in (0.0, -2.0, 3.0):
        noise = brightness.nudged_noise(7, (4, 16, 16), unit, k)
        torch.testing.assert_close(noise.mean(dim=(1, 2)), k / 16 * unit, atol=1e-6, rtol=0)
        # what is left once the means are removed is the drawn noise's own
        torch.testing.assert_close(noise - noise.mean(dim=(1, 2), keepdim=True),
                                   plain - plain.mean(dim=(1, 2), keepdim=True), atol=1e-6, rtol=0)


def test_direction_points_from_black_to_white():
    pipe = StableDiffusion.from_pretrained("tiny")
    unit = brightness.direction(pipe)
    assert unit.shape == (4,) and abs(unit.norm().item() - 1) < 1e-5
    # a white picture's latent means project further along it than a gray one's, and a gray one's than black's
    proj = [(brightness.channel_means(pipe, bg) @ unit).item() for bg in ("black", "gray", "white")]
    assert proj[0] < proj[1] < proj[2], proj


def test_prompts_name_the_background_and_parse():
    ps = brightness.prompts("white")
    assert len(ps) == len(set(ps)) == 180
    assert all(analyser.parse(p)[1] == "white" and len(analyser.parse(p)[0]) == 1 for p in ps)
    with pytest.raises(ValueError, match="background = 'pink'"):
        brightness.prompts("pink")


def test_the_documented_numbers_are_the_measured_ones():
    """docs/shapes_world.md quotes docs/results/brightness.json; each quoted share is the file's."""
    results = json.loads((ROOT / "docs" / "results" / "brightness.json").read_text())
    doc = (ROOT / "docs" / "shapes_world.md").read_text()
    section = doc[doc.index("### The starting noise's brightness"):]
    section = section[:section.index("\n## ", 1) if "\n## " in section[1:] else len(section)]
    header = [c.strip() for c in next(line for line in section.splitlines() if line.startswith("| model |")).split("|")]
    for r in results.values():
        cell = f"{100 * r['kept']:.0f}% ({100 * r['low']:.0f}–{100 * r['high']:.0f})"
        label = r["model"] + ("" if r.get("steps", 25) == 25 else f", {r['steps']} steps")
        row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
        column = header.index(f"k = {r['k']:+g}")
        assert row.split("|")[column].strip() == cell, f"{label} k {r['k']:+g}: {cell} not in {row!r}"
    assert "the 180 one-object prompts that name a white" in section and all(r["n"] == 180 for r in results.values())
    kept = {(r["model"], r["k"]): round(100 * r["kept"]) for r in results.values()}
    assert f"at k = −2 it draws {100 - kept['tiny', -2]}% of the white backgrounds gray\n  or black" in section
    assert f"v model keeps {kept['tiny_v', -2]}% there" in section and f"(σ = 1), {kept['tiny_flow', -2]}%" in section
    assert 40 <= kept["tiny_v", -3] <= 60 and "it loses\n  half" in section              # "loses half"
    assert 28 <= 100 - kept["tiny_lcm", -1] <= 39 and "a third of its white backgrounds go dark" in section
    assert f"the LCM keeps about what its\n  teacher keeps ({kept['tiny_lcm_v', -1]}% at k = −1, against {kept['tiny_v', -1]}%)" in section
    assert abs(kept["tiny_lcm_v", -1] - kept["tiny_v", -1]) <= 5
    # the ordering the text draws: v keeps most, then flow, then ε, then the LCM, at every lean toward black
    for k in (-1, -2, -3):
        assert kept["tiny_v", k] >= kept["tiny_flow", k] > kept["tiny", k] > kept["tiny_lcm", k], k
