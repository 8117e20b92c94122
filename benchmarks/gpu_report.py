"""The tables of docs/benchmarks.md from the JSON files that benchmarks/gpu.py wrote (--json).

    python benchmarks/gpu_report.py benchmarks/results/gpu_h100_run1.json benchmarks/results/gpu_h100_run2.json

Prints markdown: every timed row (with the run it came from), the issue's goals checked against
rows of the same run, the fast paths one at a time, and where the peak memory comes from. Both
pipelines live in one process, so `torch.cuda.max_memory_allocated` includes the other library's
weights too; the "alone" figures subtract them (the weights' size is computed from the SD 1.5 shapes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu import path_text, row_text  # noqa: E402

from minisd import SD15, AutoencoderKL, TextEncoder, UNet  # noqa: E402


def weights_gib(cfg=SD15, bytes_per_value: int = 2) -> float:
    """fp16 weights of one pipeline (U-Net + VAE + text encoder), counted on the meta device."""
    with torch.device("meta"):
        n = sum(p.numel() for m in (UNet(cfg.unet), AutoencoderKL(cfg.vae), TextEncoder(cfg.text_encoder))
                for p in m.parameters())
    return n * bytes_per_value / 2**30


def goals(rows: list[dict], w: float) -> list[str]:
    """The issue's goals, each checked against the diffusers rows of the same run, batch and steps."""
    by = {(r["run"], r["mode"], r["batch"], r["steps"]): r for r in rows if r["mode"] != "paths"}
    out = ["| run | batch | steps | eager: minisd vs diffusers | best vs diffusers eager | best vs diffusers compiled | "
           "peak GiB alone, eager: minisd / diffusers | peak GiB alone, compiled: minisd / diffusers | "
           "peak GiB alone, best | image diff mean (worst mode) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (run, mode, batch, steps), e in sorted(by.items()):
        if mode != "eager":
            continue
        c, b = by.get((run, "compiled", batch, steps)), by.get((run, "best", batch, steps))
        f = lambda v, fmt: "–" if v is None else format(v, fmt)  # noqa: E731
        ratio = lambda ref, ours: ref["diffusers_s_per_image"] / ours["minisd_s_per_image"] if ref and ours else None  # noqa: E731
        alone = lambda r, k: r[k] - w if r and r.get(k) == r.get(k) and r.get(k) is not None else None  # noqa: E731
        diffs = [r["diff_mean"] for r in (e, c, b) if r and r.get("diff_mean") is not None]
        out.append(f"| {run} | {batch} | {steps} | {f(ratio(e, e), '.2f')}× | {f(ratio(e, b), '.2f')}× | "
                   f"{f(ratio(c, b), '.2f')}× | {f(alone(e, 'minisd_peak_gib'), '.2f')} / "
                   f"{f(alone(e, 'diffusers_peak_gib'), '.2f')} | {f(alone(c, 'minisd_peak_gib'), '.2f')} / "
                   f"{f(alone(c, 'diffusers_peak_gib'), '.2f')} | {f(alone(b, 'minisd_peak_gib'), '.2f')} | "
                   f"{f(max(diffs) if diffs else None, '.1e')} |")
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    runs = [json.loads(Path(f).read_text()) for f in args.files]
    rows = [dict(r, run=i + 1) for i, data in enumerate(runs) for r in data["rows"]]
    w = weights_gib()
    lines = [f"Run {i + 1}: {data['environment']}; `{' '.join(_command(data['args']))}`"
             + (f"; errors: {[e['where'] for e in data['errors']]}" if data.get("errors") else "")
             for i, data in enumerate(runs)]
    lines += ["", "| run | mode | batch | steps | minisd s/image | diffusers s/image | speed-up | minisd it/s | "
                  "diffusers it/s | minisd peak GiB | diffusers peak GiB | image diff max / mean | first call s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} " + row_text(r) for r in rows if r["mode"] != "paths"]
    lines += ["", f"The issue's goals, same run, batch and steps (peak \"alone\" = measured peak − the other "
                  f"library's fp16 weights, {w:.2f} GiB):", ""] + goals(rows, w)
    paths = [r for r in rows if r["mode"] == "paths"]
    if paths:
        lines += ["", "Fast paths one at a time (minisd eager, diff against minisd's own eager image; peak as "
                      "measured, both pipelines' weights included):", "",
                  "| mode | fast path | batch | steps | minisd s/image | vs eager | minisd peak GiB | diffusers peak GiB | "
                  "image diff max / mean | finite |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [path_text(r) for r in paths]
    text = "\n".join(lines)
    print(text)
    return text


def _command(a: dict) -> list[str]:
    words = ["python", "benchmarks/gpu.py"]
    for k, v in a.items():
        if v is None or k == "json" or (k == "model" and v == "sd15") or (k == "device" and v == "cuda"):
            continue
        words += [f"--{k.replace('_', '-')}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    return words


if __name__ == "__main__":
    main()
