"""benchmarks/gpu.py is prepared and tested on CPU with a small SD-1.5-layout model; the GPU run
(SD 1.5 size, eager and compiled) is recorded in docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_runs_on_cpu_with_a_small_model(tmp_path, capsys):
    gpu = load("gpu")
    out = tmp_path / "rows.json"
    rows = gpu.main(["--model", "small", "--device", "cpu", "--dtype", "float32", "--size", "64", "--steps", "3",
                     "--batch", "1", "2", "--modes", "eager", "--repeats", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| eager | 1 | 3 |" in printed and "| eager | 2 | 3 |" in printed
    assert [(r["batch"], r["steps"]) for r in rows] == [(1, 3), (2, 3)]
    for r in rows:  # same weights, same noise: the same pictures
        assert r["diff_max"] < 1e-4 and r["minisd_s_per_image"] > 0 and r["diffusers_s_per_image"] > 0
    assert json.loads(out.read_text())["rows"][0]["mode"] == "eager"
