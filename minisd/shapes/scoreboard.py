"""One table for every shapes-world model: adherence, FID and speed against the sampling budget.

For each model folder (the shipped ε model data/tiny, and the v, flow and LCM models beside it when
they exist) and each (sampler, steps) setting of its kind (`SETTINGS`), the same pictures give

- adherence per factor (colour, shape, position, size, background; "both" for two objects), with
  Wilson's 95% interval over the pictures (`sweeps.rate`): the 240 evaluation prompts × D noise draws
  (seeds 0, 1000, ...: prompt i of draw d starts from the noise of seed 1000·d + i);
- FID and KID on the fixed shapes-world features (`features.features`) against renders of the same
  prompts, beside the floor: the same distances between two independent sets of renders. Both are
  biased by the number of pictures N (240·D here), so they compare only at equal N (metrics.py);
- seconds per picture: the wall clock of generation (decoding included) over the pictures, with the
  number of threads it ran on; and the network evaluations, NFE = steps × 2 with classifier-free
  guidance (the conditional and the unconditional pass), × 1 without it or for an LCM student, which
  reads the guidance scale as an input.

`minisd eval --fid` uses `fid_table` for one model; `benchmarks/scoreboard.py` runs `run`, which
writes docs/results/scoreboard.json after each (model, setting), so a long run resumes where it stopped.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..formats.files import atomic_write_text
from ..metrics import frechet_distance, kid_subsets
from ..pipeline import DATA, StableDiffusion
from .analyser import eval_prompts, generate_for, render_prompt
from .features import NAMES, features
from .sweeps import rate, records_of

OUT = DATA.parent / "docs" / "results" / "scoreboard.json"
REAL_SEED = 1_000_000   # render j of the reference set: unnamed attributes and jitter from this seed + j
FLOOR_SEED = 2_000_000  # the second, independent set of renders, for the floor
KID_SUBSETS = 100
FACTORS = ("colour", "shape", "position", "size", "background", "both")

# What each kind of model is run at: (sampler, steps, guidance scale). ε, v and x0 models with DDIM
# and flow models with Euler along the flow, at CFG 7.5 (two U-Net passes a step). An LCM model with
# its own sampler at 1–8 steps: distillation built the guidance into the network. The student of
# train_lcm.py reads the scale as an input (distilled at s in [3, 9]; 1 would mean unguided) and runs
# one pass a step, so it gets the teacher's 7.5; an LCM U-Net without that input would want 1 here.
_FULL = (1, 2, 4, 8, 25)   # NFE 2 to 50 with CFG; the LCM's 1 to 8
SETTINGS = {
    "epsilon": [("ddim", n, 7.5) for n in _FULL],
    "v_prediction": [("ddim", n, 7.5) for n in _FULL],
    "sample": [("ddim", n, 7.5) for n in _FULL],
    "flow": [("flow_euler", n, 7.5) for n in _FULL],
    "lcm": [("lcm", n, 7.5) for n in (1, 2, 4, 8)],
}


# ─── FID and KID against renders ───────────────────────────────────────────────────────────────────

def cycled(prompts: list[str], n: int) -> list[str]:
    """n prompts: the list repeated (prompt i is prompts[i mod len])."""
    return [prompts[i % len(prompts)] for i in range(n)]


def renders(prompts: list[str], seed: int) -> list[Image.Image]:
    """The ground truth of each prompt (`analyser.render_prompt`), prompt j drawn with seed + j."""
    return [render_prompt(p, seed=seed + j) for j, p in enumerate(prompts)]


def distances(generated: np.ndarray, real: np.ndarray) -> dict:
    """FID and KID between two (N, 59) feature sets. KID is the mean (and standard deviation) over
    `KID_SUBSETS` subsets of half the pictures: subsets of all N would be the same set every time."""
    kid = kid_subsets(generated, real, subset_size=max(2, min(1000, min(len(generated), len(real)) // 2)),
                      subsets=KID_SUBSETS)
    return {"N": len(generated), "FID": frechet_distance(generated, real), "KID": float(kid.mean()),
            "KID std": float(kid.std())}


def reference(prompts: list[str]) -> tuple[np.ndarray, dict]:
    """The features of renders of `prompts` (what generated pictures are measured against), and the
    floor: FID and KID of a second, independent set of renders of the same prompts against them."""
    real = features(renders(prompts, REAL_SEED))
    return real, distances(features(renders(prompts, FLOOR_SEED)), real)


def fid_table(pipe: StableDiffusion, n: int, guidance_scales: list[float], steps: int, sampler: str | None,
              seed: int = 0) -> dict[str, dict]:
    """`minisd eval --fid`: n pictures of the evaluation prompts cycled (prompt i from the noise of
    seed + i) at each guidance scale, against renders of the same prompts; the floor last.
    {row: {"N", "FID", "KID", "KID std", "seconds per image"}}."""
    prompts = cycled(eval_prompts(), n)
    real, floor = reference(prompts)
    rows = {}
    for scale in guidance_scales:
        t0 = time.perf_counter()
        images = generate_for(pipe, prompts, scale, steps, sampler, seed)
        seconds = (time.perf_counter() - t0) / n
        rows[f"CFG {scale:g}"] = {**distances(features(images), real), "seconds per image": seconds}
        print(f"CFG {scale:g}: {n} pictures in {seconds * n:.0f}s", flush=True)
    rows["floor: renders vs renders"] = {**floor, "seconds per image": None}
    return rows


# ─── adherence, FID and speed for each model and setting ───────────────────────────────────────────

def model_kind(folder: str | Path, pipe: StableDiffusion) -> str:
    """What `SETTINGS` to run: "lcm" for a latent consistency model (its scheduler config names
    LCMScheduler, as train_lcm.py saves it, or its U-Net embeds the guidance scale), else the
    scheduler's prediction type."""
    scheduler = Path(folder) / "scheduler" / "scheduler_config.json"
    if scheduler.is_file() and json.loads(scheduler.read_text()).get("_class_name") == "LCMScheduler":
        return "lcm"
    if getattr(pipe.backbone.config, "time_cond_proj_dim", None) is not None:
        return "lcm"
    return pipe.scheduler.prediction_type


def passes(pipe: StableDiffusion, guidance_scale: float) -> int:
    """U-Net evaluations a step: 2 under classifier-free guidance (the conditional and the unconditional
    pass), 1 without it (scale ≤ 1) or when the U-Net reads the scale as an input (an LCM student)."""
    embedded = getattr(pipe.backbone.config, "time_cond_proj_dim", None) is not None
    return 1 if guidance_scale <= 1 or embedded else 2


def default_models() -> list[Path]:
    """data/tiny, and whichever of data/tiny_v, data/tiny_flow, data/tiny_lcm, data/tiny_lcm_v, data/tiny_mmdit exist."""
    return [DATA / "tiny"] + [DATA / name for name in ("tiny_v", "tiny_flow", "tiny_lcm", "tiny_lcm_v", "tiny_mmdit")
                              if (DATA / name).is_dir()]


def score_setting(pipe: StableDiffusion, prompts: list[str], seeds: list[int], sampler: str, steps: int,
                  guidance_scale: float, real: np.ndarray) -> dict:
    """One row of the scoreboard: every prompt under every seed, judged, measured and timed."""
    images, records = [], []
    t0 = time.perf_counter()
    for seed in seeds:
        images += generate_for(pipe, prompts, guidance_scale, steps, sampler, seed)
    seconds = time.perf_counter() - t0
    for k, seed in enumerate(seeds):
        records += records_of(prompts, images[k * len(prompts):(k + 1) * len(prompts)], seed)
    adherence = {f: list(rate(records, f)) for f in FACTORS if any(f in r["ok"] for r in records)}
    return {"sampler": sampler, "steps": steps, "NFE": steps * passes(pipe, guidance_scale),
            "guidance_scale": guidance_scale, "adherence": adherence, **distances(features(images), real),
            "seconds per image": seconds / len(images), "threads": torch.get_num_threads()}


def _settings(prompts: list[str], seeds: list[int]) -> dict:
    return {"prompts": len(prompts), "seeds": seeds, "pictures": len(prompts) * len(seeds),
            "features": f"minisd.shapes.features ({len(NAMES)})", "kid_subsets": KID_SUBSETS,
            "render_seeds": [REAL_SEED, FLOOR_SEED]}


def load_board(out: Path, prompts: list[str], seeds: list[int], fresh: bool) -> dict:
    """The scoreboard so far at `out` (to resume), or a new one; ValueError if `out` holds one of
    other settings (prompts, seeds), whose numbers this run's could not stand beside."""
    settings = _settings(prompts, seeds)
    if fresh or not out.exists():
        return {"settings": settings, "floor": None, "entries": {}}
    board = json.loads(out.read_text())
    if board.get("settings") != settings:
        raise ValueError(f"{out} holds a scoreboard of other settings ({board.get('settings')}); expected "
                         f"{settings}: pass --fresh to start again, or another --out")
    return board


def run(models: list[str | Path], draws: int = 2, prompts: list[str] | None = None, out: Path = OUT,
        fresh: bool = False, device: str | None = None, settings: dict | None = None) -> dict:
    """Every setting of every model (`settings`, default `SETTINGS`, by `model_kind`), written to `out`
    after each one; entries already in `out` are kept and skipped unless `fresh`."""
    settings = SETTINGS if settings is None else settings
    prompts = prompts or eval_prompts()
    seeds = [1000 * d for d in range(draws)]
    out = Path(out)
    board = load_board(out, prompts, seeds, fresh)
    real, board["floor"] = reference([p for _ in seeds for p in prompts])  # draw-major, as generated
    for folder in models:
        pipe = StableDiffusion.from_pretrained(folder, device=device)
        pipe.progress = False
        kind = model_kind(folder, pipe)
        if kind not in settings:
            raise ValueError(f"{folder}: a model of kind {kind!r}; the scoreboard runs {', '.join(settings)}")
        for sampler, steps, scale in settings[kind]:
            key = f"{Path(folder).name} / {sampler} {steps}"
            if key in board["entries"]:
                continue
            board["entries"][key] = {"model": str(folder), "kind": kind,
                                     **score_setting(pipe, prompts, seeds, sampler, steps, scale, real)}
            board["machine"] = {"platform": platform.platform(), "torch": torch.__version__,
                                "device": str(pipe.device)}
            atomic_write_text(out, json.dumps(board, indent=1) + "\n")
            e = board["entries"][key]
            print(f"{key}: FID {e['FID']:.3f}, {e['seconds per image']:.3f} s/image", flush=True)
    return board


def _rate_cell(r: list | None) -> str:
    return "–" if r is None else f"{100 * r[0]:.0f}% ({100 * r[1]:.0f}–{100 * r[2]:.0f})"


def format_board(board: dict) -> str:
    """The scoreboard as a markdown table, its N and floor in the line above."""
    s, floor = board["settings"], board["floor"]
    summary = (f"N = {s['pictures']} pictures ({s['prompts']} prompts × {len(s['seeds'])} draws); adherence with "
               f"Wilson 95% intervals; FID/KID on {s['features']} features against renders; floor (renders vs "
               f"renders): FID {floor['FID']:.3f}, KID {floor['KID']:.5f} ± {floor['KID std']:.5f}")
    header = ("| model | sampler | steps | NFE | CFG | " + " | ".join(FACTORS[:-1])
              + " | two objects: both | FID | KID | s/image (threads) |")
    lines = [summary, "", header, "|" + "---|" * 14]
    for key, e in board["entries"].items():
        cells = [key.split(" / ")[0], e["sampler"], str(e["steps"]), str(e["NFE"]), f"{e['guidance_scale']:g}"]
        cells += [_rate_cell(e["adherence"].get(f)) for f in FACTORS]
        cells += [f"{e['FID']:.3f}", f"{e['KID']:.5f} ± {e['KID std']:.5f}",
                  f"{e['seconds per image']:.3f} ({e['threads']})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
