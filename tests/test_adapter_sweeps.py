"""minisd.shapes.adapter_sweeps: refuses careless calls, and docs/results/adapter_sweeps.json is its output."""

import json
from pathlib import Path

import pytest

from minisd import StableDiffusion
from minisd.shapes import adapter_sweeps as sw

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "adapter_sweeps.json"


def test_window_ious_needs_a_controlnet():
    pipe = StableDiffusion.from_pretrained("tiny", device="cpu")
    with pytest.raises(ValueError, match="ControlNet"):
        sw.window_ious(pipe, [(0.0, 0.3)], n=1)


def test_stored_windows_cover_20_layouts():
    stored = json.loads(RESULTS.read_text())["controlnet windows"]
    assert stored["layouts"] == 20
    assert set(stored["iou"]) == {"0-1", "0-0.3", "0.3-1", "0.5-1"}
    assert all(len(v) == 20 and all(0 <= x <= 1 for x in v) for v in stored["iou"].values())
