"""Did the clip show what its caption asked? Direction of motion and identity, read from the frames.

Without the model that made them, as the analyser reads pictures (analyser.py):

1. each frame: the analyser's objects; the asked colour's object (else the largest one) is *the object*;
   the frame keeps the identity if the asked colour is there with the asked shape;
2. across frames, the direction: the centroid of the object's pixels in each frame, a straight line fitted
   through them (least squares against the frame number), its displacement over the clip
   (dx, dy) = slope · (F − 1); the dominant axis and its sign name the direction, or "none" when the
   object moved less than `MIN_TRAVEL` px (the clips of moving.py travel at least 25);
3. the clip: direction right if it is the asked one; identity kept if the asked colour and shape are
   there in at least F − 1 of its F frames (7 of 8).

`judge_clips(frames, captions)` gives one record per clip; `summarise(records)` the shares, each with its
Wilson interval (metrics.wilson_interval). On ground-truth clips (moving.py) every share is 100%.

`evaluate(folder)` samples clips of a trained motion module for held-out captions and judges them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..formats.files import atomic_write_text
from ..metrics import wilson_interval
from ..viz import image_grid
from .analyser import analyse
from .moving import MOTION_PHRASES, Clip, clip_tensor, eval_clips, held_out
from .train_motion import clip_loss, load_frozen, load_motion, sample_clips
from .world import COLOURS, SHAPES

MIN_TRAVEL = 8.0  # px over the clip: less is "none"

_CAPTION = re.compile(r"an? (?:(small|large) )?(\w+) (\w+) (" + "|".join(MOTION_PHRASES.values()) +
                      r")(?: on a (\w+) background)?")
_DIRECTION = {phrase: d for d, phrase in MOTION_PHRASES.items()}


@dataclass
class Asked:
    colour: str
    shape: str
    size: str | None
    direction: str
    background: str | None


def parse_caption(caption: str) -> Asked:
    """'a small red circle moving to the left on a black background' -> Asked(red, circle, small, left, black)."""
    m = _CAPTION.fullmatch(caption.strip())
    if not m or m.group(2) not in COLOURS or m.group(3) not in SHAPES:
        raise ValueError(f"not in the moving-shapes grammar (a [small|large] <colour> <shape> moving ...): {caption!r}")
    return Asked(m.group(2), m.group(3), m.group(1), _DIRECTION[m.group(4)], m.group(5))


def to_uint8(frames) -> np.ndarray:
    """Frames (B, F, 3, H, W) in [0, 1] (a tensor or array) -> uint8 (B, F, H, W, 3), as the analyser reads."""
    x = frames.detach().float().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames, np.float32)
    if x.ndim != 5 or x.shape[2] != 3:
        raise ValueError(f"frames have shape {tuple(x.shape)}; expected (B, F, 3, H, W) in [0, 1]")
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8).transpose(0, 1, 3, 4, 2)


def direction_of(centroids: list[tuple[float, float] | None]) -> tuple[str, float, float]:
    """(direction, dx, dy) of a centroid track (None where a frame shows no object): the fitted line's
    displacement over the whole clip; "none" with fewer than two frames or less than MIN_TRAVEL px."""
    seen = [(f, c) for f, c in enumerate(centroids) if c is not None]
    if len(seen) < 2:
        return "none", 0.0, 0.0
    f = np.array([s[0] for s in seen], dtype=np.float64)
    xy = np.array([s[1] for s in seen], dtype=np.float64)  # (n, 2)
    slope = ((f - f.mean())[:, None] * (xy - xy.mean(0))).sum(0) / ((f - f.mean()) ** 2).sum()  # px per frame
    dx, dy = slope * (len(centroids) - 1)
    if max(abs(dx), abs(dy)) < MIN_TRAVEL:
        return "none", float(dx), float(dy)
    if abs(dx) >= abs(dy):
        return ("right" if dx > 0 else "left"), float(dx), float(dy)
    return ("down" if dy > 0 else "up"), float(dx), float(dy)


def judge_clip(frames: np.ndarray, caption: str) -> dict:
    """One clip, uint8 (F, H, W, 3), against its caption: what the record of `judge_clips` holds."""
    asked = parse_caption(caption)
    centroids, colour_frames, shape_frames, kept = [], 0, 0, 0
    for frame in frames:
        a = analyse(frame)
        found = a.find(asked.colour)
        obj = found or (a.objects[0] if a.objects else None)
        if obj is None:
            centroids.append(None)
        else:
            ys, xs = np.nonzero(obj.mask)
            centroids.append((float(xs.mean()) + 0.5, float(ys.mean()) + 0.5))
        colour_frames += found is not None
        shape_frames += obj is not None and obj.shape == asked.shape
        kept += found is not None and found.shape == asked.shape
    seen, dx, dy = direction_of(centroids)
    need = len(frames) - 1  # 7 of 8
    return {"caption": caption, "direction": asked.direction, "seen": seen, "dx": round(dx, 2), "dy": round(dy, 2),
            "frames": len(frames), "colour_frames": colour_frames, "shape_frames": shape_frames, "kept_frames": kept,
            "direction_ok": seen == asked.direction, "colour_ok": colour_frames >= need,
            "shape_ok": shape_frames >= need, "identity_ok": kept >= need}


def judge_clips(frames, captions: list[str]) -> list[dict]:
    """Frames (B, F, 3, H, W) in [0, 1] and the B captions asked -> one record per clip: the direction asked and
    seen, the displacement (dx, dy) in px, in how many frames the asked colour, shape and both were found,
    and the verdicts direction_ok, colour_ok, shape_ok, identity_ok (colour and shape in ≥ F − 1 frames)."""
    x = to_uint8(frames)
    if len(captions) != len(x):
        raise ValueError(f"{len(captions)} captions for {len(x)} clips")
    return [judge_clip(clip, caption) for clip, caption in zip(x, captions)]


SHARES = {"direction": "direction_ok", "identity": "identity_ok", "colour": "colour_ok", "shape": "shape_ok"}


def summarise(records: list[dict]) -> dict[str, dict]:
    """{share: {"share", "successes", "n", "low", "high"}} for direction, identity (asked colour and shape in
    ≥ F − 1 frames), colour, shape, and both (direction and identity), each with its 95% Wilson interval."""
    if not records:
        raise ValueError("no clips to summarise")
    verdicts = {name: [r[key] for r in records] for name, key in SHARES.items()}
    verdicts["both"] = [r["direction_ok"] and r["identity_ok"] for r in records]
    out = {}
    for name, ok in verdicts.items():
        k, n = int(sum(ok)), len(ok)
        low, high = wilson_interval(k, n)
        out[name] = {"share": k / n, "successes": k, "n": n, "low": round(low, 4), "high": round(high, 4)}
    return out


def format_summary(summary: dict[str, dict]) -> str:
    """One line: 'direction 81% [66–91%] of 32, identity ...'."""
    return ", ".join(f"{name} {100 * s['share']:.0f}% [{100 * s['low']:.0f}–{100 * s['high']:.0f}%] of {s['n']}"
                     for name, s in summary.items())


# ─── a trained motion module, measured ─────────────────────────────────────────────────────────────

def evaluate_video(pipe, video, clips: list[Clip], steps: int = 25, guidance_scale: float = 7.5, seed: int = 0,
                   grid: str | None = None) -> dict:
    """Sample one clip per held-out clip's caption (clip i from the noise of seed + i) and judge it:
    {"records", "summary" (all clips), "seen" and "held_out" (summaries over the clips whose (colour, shape,
    direction) training saw or never saw)}. `grid`: a PNG of the clips, one row of frames each."""
    captions = [c.caption for c in clips]
    frames = sample_clips(pipe, video, captions, steps=steps, guidance_scale=guidance_scale, seed=seed)
    records = judge_clips(frames, captions)
    for record, clip in zip(records, clips):
        record["held_out"] = held_out(clip.colour, clip.shape, clip.direction)
    if grid:
        image_grid([f * 2 - 1 for f in frames.flatten(0, 1)], nrow=frames.shape[1]).save(grid)
    out = {"records": records, "summary": summarise(records)}
    for name, group in (("seen", False), ("held_out", True)):
        chosen = [r for r in records if r["held_out"] == group]
        if chosen:
            out[name] = summarise(chosen)
    return out


OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@torch.no_grad()
def direction_gap(pipe, video, clips: list[Clip], timesteps: tuple[int, ...] = (200, 500, 800),
                  seed: int = 0) -> dict[int, dict[str, float]]:
    """Whether the direction reaches the prediction at all, without sampling: the ε loss on the clips (their
    own frames, noise from `seed`) with their captions and with the direction turned round ("to the left" <->
    "to the right", "up" <-> "down"), at each timestep: {t: {"loss", "swapped", "gap"}}, gap = swapped / loss − 1.
    A module that reads the direction has a clearly positive gap; one that ignores it, about 0."""
    frames = torch.cat([clip_tensor(c) for c in clips]).to(pipe.device, pipe.dtype)  # (N·F, 3, 64, 64)
    z0 = pipe.vae.encode(frames).mode().unflatten(0, (len(clips), -1)) * pipe.vae.scaling_factor  # (N, F, 4, h, w)
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0)
    alpha_bar = pipe.scheduler.alphas_cumprod().to(pipe.device)
    right = [c.caption for c in clips]
    turned = [c.caption.replace(MOTION_PHRASES[c.direction], MOTION_PHRASES[OPPOSITE[c.direction]]) for c in clips]
    out = {}
    for t in timesteps:
        ts = torch.full((len(clips),), t, device=pipe.device)
        loss, swapped = (clip_loss(video, pipe, captions, z0, ts, eps, alpha_bar, None).item()
                         for captions in (right, turned))
        out[t] = {"loss": loss, "swapped": swapped, "gap": swapped / loss - 1}
    return out


def evaluate(motion: str, n: int = 32, model: str = "tiny", steps: int = 25, guidance_scale: float = 7.5,
             seed: int = 0, grid: str | None = None, gap: bool = False) -> dict:
    """A saved motion module (train_motion.py's folder) on `n` held-out clips (moving.eval_clips); `gap`: with
    its `direction_gap` on the same clips (under "gap")."""
    pipe = load_frozen(model, "cpu")
    video, clips = load_motion(pipe, motion), eval_clips(n)
    out = evaluate_video(pipe, video, clips, steps, guidance_scale, seed, grid)
    if gap:
        out["gap"] = direction_gap(pipe, video, clips, seed=seed)
    return out


def main(argv: list[str] | None = None) -> dict:
    """`python -m minisd.shapes.video_eval --motion FOLDER`: direction and identity on held-out clips."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m minisd.shapes.video_eval", description=main.__doc__)
    ap.add_argument("--motion", required=True, help="a motion module folder (minisd train motion's --out)")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--n", type=int, default=32, help="held-out clips (default 32)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the records and summaries here")
    ap.add_argument("--grid", default=None, help="write the clips here as a PNG, one row each")
    ap.add_argument("--gap", action="store_true", help="also the loss gap with the direction turned round")
    args = ap.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        raise ValueError(f"--n and --steps must be at least 1, got {args.n} and {args.steps}")
    result = report(args.motion, args.n, args.model, args.steps, args.cfg, args.seed, args.grid, args.gap)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1))
    return result


def report(motion: str, n: int = 32, model: str = "tiny", steps: int = 25, guidance_scale: float = 7.5, seed: int = 0,
           grid: str | None = None, gap: bool = False) -> dict:
    """`evaluate`, its summaries printed (what `minisd eval --video` runs)."""
    result = evaluate(motion, n, model, steps, guidance_scale, seed, grid, gap)
    for name in ("summary", "seen", "held_out"):
        if name in result:
            print(f"{name}: {format_summary(result[name])}")
    for t, g in result.get("gap", {}).items():
        print(f"t={t}: ε loss {g['loss']:.4f}, direction turned round {g['swapped']:.4f} ({100 * g['gap']:+.1f}%)")
    return result


__all__ = ["Asked", "direction_gap", "report", "MIN_TRAVEL", "direction_of", "evaluate", "evaluate_video", "format_summary", "judge_clip",
           "judge_clips", "main", "parse_caption", "summarise", "to_uint8"]


if __name__ == "__main__":
    main()
