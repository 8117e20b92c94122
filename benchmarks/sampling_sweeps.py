"""The sweeps behind notebooks 07 and 08, on the shipped tiny model (CPU):

    python benchmarks/sampling_sweeps.py steps      # -> docs/results/samplers_steps.json
    python benchmarks/sampling_sweeps.py guidance   # -> docs/results/guidance_scale.json

steps: adherence against the number of steps for two samplers, on 60 prompts of the evaluation
list (every 4th: 45 one-object, 15 two-object), one noise draw each, CFG 7.5, DDIM and Euler ancestral.
guidance: adherence and diversity against the guidance scale, on the 36 `open_prompts` (position
and background left open) and 24 two-object prompts, four noise draws each, DDIM 8 steps.
Each file holds every picture's record (`minisd.shapes.sweeps.picture_records`), written after each
setting, so the notebooks can recompute any rate and check a part live.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from minisd.shapes import analyser as ev
from minisd.shapes import course
from minisd.shapes.sweeps import open_prompts, picture_records

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"

STEPS = {"prompts": ev.eval_prompts()[::4], "seeds": [0], "guidance_scale": 7.5,
         "samplers": ["ddim", "euler_a"], "steps": [4, 8, 16]}
GUIDANCE = {"prompts": open_prompts() + [p for p in ev.eval_prompts() if " and " in p][:24], "seeds": [0, 1000, 2000, 3000],
            "sampler": "ddim", "steps": 8, "scales": [1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0]}


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def sweep_steps(pipe) -> None:
    cfg, records = STEPS, {}
    for sampler in cfg["samplers"]:
        for n in cfg["steps"]:
            t0 = time.perf_counter()
            records[f"{sampler}/{n}"] = picture_records(pipe, cfg["prompts"], cfg["seeds"], sampler=sampler,
                                                        steps=n, guidance_scale=cfg["guidance_scale"])
            print(f"{sampler} {n} steps: {time.perf_counter() - t0:.0f}s", flush=True)
            _write(OUT / "samplers_steps.json", {"settings": cfg, "records": records})


def sweep_guidance(pipe) -> None:
    cfg, records = GUIDANCE, {}
    for scale in sorted(cfg["scales"], key=lambda s: (s not in (1.0, 7.5), s)):  # the usual pair first
        t0 = time.perf_counter()
        records[f"{scale:g}"] = picture_records(pipe, cfg["prompts"], cfg["seeds"], sampler=cfg["sampler"],
                                                steps=cfg["steps"], guidance_scale=scale)
        print(f"CFG {scale:g}: {time.perf_counter() - t0:.0f}s", flush=True)
        _write(OUT / "guidance_scale.json", {"settings": cfg, "records": records})


if __name__ == "__main__":
    parts = sys.argv[1:] or ["steps", "guidance"]
    if not set(parts) <= {"steps", "guidance"}:
        raise SystemExit(f"parts = {parts}; expected 'steps' and/or 'guidance'")
    OUT.mkdir(parents=True, exist_ok=True)
    pipe = course.model()
    for part in parts:
        {"steps": sweep_steps, "guidance": sweep_guidance}[part](pipe)
