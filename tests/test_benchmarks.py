"""benchmarks/gpu.py is prepared and tested on CPU with small SD-1.5-, SDXL- and SD-3-layout models; the GPU run
(SD 1.5 size, eager and compiled) is recorded in docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

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
                     "--batch", "1", "2", "--modes", "eager", "paths", "--paths-batch", "1", "--repeats", "1",
                     "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| eager | 1 | 3 |" in printed and "| eager | 2 | 3 |" in printed
    eager = [r for r in rows if r["mode"] == "eager"]
    assert [(r["batch"], r["steps"]) for r in eager] == [(1, 3), (2, 3)]
    for r in eager:  # same weights, same noise: the same pictures
        assert r["diff_max"] < 1e-4 and r["minisd_s_per_image"] > 0 and r["diffusers_s_per_image"] > 0
    paths = {r["path"]: r for r in rows if r["mode"] == "paths"}
    for name in ("fused QKV", "attention slicing (1024)", "model CPU offload"):  # exact rewrites of the same sums
        assert paths[name]["diff_max"] < 1e-5 and paths[name]["finite"], name
    assert 0 < paths["int8 weight-only"]["diff_mean"] < 1e-2  # rounding, not garbage
    assert 0 < paths["fp8 (e4m3 weights and activations, scaled matmuls)"]["diff_mean"] < 3e-2
    assert paths["peak: denoising only (output_type latent)"]["diff_max"] < 1e-4  # the two libraries' latents
    data = json.loads(out.read_text())  # written row by row, errors kept (none here)
    assert data["rows"][0]["mode"] == "eager" and data["errors"] == [] and len(data["rows"]) == len(rows)


def test_gpu_report_prints_the_tables_and_checks_the_goals(tmp_path):
    report = load("gpu_report")
    w = report.weights_gib()
    assert 1.95 < w < 2.0  # SD 1.5: 1.07 B parameters in fp16

    def row(mode, ours, ref, peak_ours, peak_ref):
        return dict(mode=mode, batch=1, steps=50, first_call_s=1.0, minisd_s_per_image=ours,
                    diffusers_s_per_image=ref, minisd_it_s=50 / ours, diffusers_it_s=50 / ref if ref else None,
                    minisd_peak_gib=peak_ours, diffusers_peak_gib=peak_ref, diff_max=1e-3, diff_mean=1e-4)

    rows = [row("eager", 1.0, 1.5, 4.5, 4.7), row("compiled", 0.9, 1.0, 4.4, 4.4), row("best", 0.4, None, 4.2, None)]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"environment": "GPU X", "args": {"steps": [50], "json": "x"}, "rows": rows}))
    text = report.main([str(path)])
    assert "| 1 | eager | 1 | 50 | 1.000 | 1.500 | 1.50× |" in text  # the timed rows, with their run
    goal = next(line for line in text.splitlines() if line.startswith("| 1 | 1 | 50 |"))
    # eager 1.5/1.0, best vs diffusers eager 1.5/0.4, best vs diffusers compiled 1.0/0.4; peaks less the other's weights
    assert "| 1.50× | 3.75× | 2.50× |" in goal and f"| {4.5 - w:.2f} / {4.7 - w:.2f} |" in goal


@pytest.mark.slow
def test_gpu_benchmark_sdxl_and_diffusers_best_recipe_run_on_cpu(tmp_path, capsys):
    """--model sdxl's path (minisd's StableDiffusionXL against diffusers' pipeline on the same weights) and the
    best-vs-best mode (diffusers' own recipe: fused QKV, channels-last, full-graph compile) on a small SDXL."""
    gpu = load("gpu")
    rows = gpu.main(["--model", "small-xl", "--device", "cpu", "--dtype", "float32", "--size", "64", "--steps", "2",
                     "--batch", "1", "--modes", "eager", "best-vs-best", "--repeats", "1",
                     "--json", str(tmp_path / "rows.json")])
    printed = capsys.readouterr().out
    assert "small-xl random weights" in printed and "| best-vs-best | 1 | 2 |" in printed
    assert [r["mode"] for r in rows] == ["eager", "best-vs-best"]
    for r in rows:   # the same pictures, eager and compiled, in both libraries
        assert r["diff_max"] < 1e-4 and r["diffusers_s_per_image"] > 0, r


def test_gpu_benchmark_sd3_runs_on_cpu(tmp_path, capsys):
    """--model sd3's path (minisd's StableDiffusion3 against diffusers' StableDiffusion3Pipeline on the same
    weights, flow Euler, CFG 7) on a small SD 3 (CLIP-L, bigG, T5, 16-channel VAE): eager, then both libraries'
    best recipes (diffusers': fused QKV in the transformer and VAE, channels-last VAE, full-graph compile)."""
    gpu = load("gpu")
    rows = gpu.main(["--model", "small-sd3", "--device", "cpu", "--dtype", "float32", "--size", "64", "--steps", "2",
                     "--batch", "1", "--modes", "eager", "best-vs-best", "--repeats", "1",
                     "--json", str(tmp_path / "rows.json")])
    printed = capsys.readouterr().out
    assert "small-sd3 random weights, 64 px, flow_euler, CFG 7.0" in printed and "| eager | 1 | 2 |" in printed
    assert [(r["mode"], r["batch"], r["steps"]) for r in rows] == [("eager", 1, 2), ("best-vs-best", 1, 2)]
    for r in rows:   # the same weights and latents: the same pictures, eager and compiled
        print(f"sd3 benchmark {r['mode']}: image diff max {r['diff_max']:.2e}, mean {r['diff_mean']:.2e}")
        assert r["diff_max"] < 1e-4 and r["finite"], r
        assert r["minisd_s_per_image"] > 0 and r["diffusers_s_per_image"] > 0, r
    assert json.loads((tmp_path / "rows.json").read_text())["errors"] == []
