"""Three ways to teach the tiny model a shape it never saw — textual inversion, LoRA, DreamBooth — measured
alike: the same held-out prompts, the same noise draws, the analyser's reading of every picture.

    rates(pipe, word)        the concept's 60 prompts (every colour × size × position, `word` in place of
                             the concept: "star", or a textual inversion's "<star>") and 60 ordinary one-object
                             prompts, under `draws` noise draws: star shape small / large, colour, position,
                             base shapes kept, base colours kept; each a rate with its Wilson interval
    compare(...)             `minisd eval --embedding/--dreambooth`: those rates beside the base model's
    markdown_table(result)   the head-to-head that benchmarks/concepts.py writes (docs/results/concepts.json)
                             as docs/adapters.md shows it

A rate reads {"rate": 0.83, "n": 180, "low": 0.77, "high": 0.88}: the share right, the pictures judged, and
the 95% interval.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..metrics import wilson_interval
from ..pipeline import StableDiffusion
from .analyser import analyse, concept_prompts, eval_prompts, generate_for, judge, parse

STEPS, GUIDANCE = 25, 7.5  # as `minisd eval`


def base_prompts() -> list[str]:
    """60 one-object prompts of the base shapes (every third of the evaluation list's 180): what must stay."""
    return [p for p in eval_prompts() if " and " not in p][::3]


def rate(oks: list[bool]) -> dict[str, float]:
    """The share of True in `oks`, how many, and its 95% Wilson interval."""
    low, high = wilson_interval(int(sum(oks)), len(oks))
    return {"rate": float(np.mean(oks)), "n": len(oks), "low": low, "high": high}


def drawn_shape(prompt: str, image) -> str:
    """What the analyser reads as the asked object's shape (the object of the asked colour, else the largest),
    or "nothing"."""
    wanted = parse(prompt)[0][0]
    a = analyse(image)
    obj = a.find(wanted.colour) or (a.objects[0] if a.objects else None)
    return obj.shape if obj is not None else "nothing"


def rates(pipe, word: str = "star", concept: str = "star", draws: int = 3, steps: int = STEPS,
          guidance_scale: float = GUIDANCE, seed: int = 0, drawn: Counter | None = None) -> dict[str, dict[str, float]]:
    """How well `pipe` draws the concept when prompts call it `word`, and how well it still draws the base
    shapes; draw d starts prompt i from the noise of seed + 1000·d + i (`analyser.generate_for`). `drawn`, if
    given, counts what the concept's pictures were read as (`drawn_shape`)."""
    asked = concept_prompts(concept)                      # judged against the plain word
    said = [p.replace(f" {concept}", f" {word}") for p in asked]  # what the model is given
    base = base_prompts()
    tallies: dict[str, list[bool]] = {}
    for d in range(draws):
        images = generate_for(pipe, said, guidance_scale, steps, seed=seed + 1000 * d)
        for prompt, image in zip(asked, images):
            verdict = judge(prompt, image)
            if drawn is not None:
                drawn[drawn_shape(prompt, image)] += 1
            size = "small" if " small " in prompt else "large"
            tallies.setdefault(f"{concept} shape, {size}", []).append(verdict["shape"])
            tallies.setdefault(f"{concept} colour", []).append(verdict["colour"])
            tallies.setdefault(f"{concept} position", []).append(verdict["position"])
        for prompt, image in zip(base, generate_for(pipe, base, guidance_scale, steps, seed=seed + 1000 * d)):
            verdict = judge(prompt, image)
            tallies.setdefault("base shapes kept", []).append(verdict["shape"])
            tallies.setdefault("base colours kept", []).append(verdict["colour"])
    order = [f"{concept} shape, small", f"{concept} shape, large", f"{concept} colour", f"{concept} position",
             "base shapes kept", "base colours kept"]
    return {k: rate(tallies[k]) for k in order}


def size_mb(path: str | Path) -> float:
    """Megabytes of a file, or of all a folder's files."""
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 1e6, 3)


def compare(base_pipe, embedding: str | None = None, dreambooth: str | None = None, concept: str = "star",
            draws: int = 3, steps: int = STEPS, seed: int = 0, device=None) -> dict[str, dict[str, float]]:
    """`minisd eval --embedding PATH` / `--dreambooth PATH`: the base model's rates beside those with the textual
    inversion loaded (its token in place of the concept's word) or of the DreamBooth model; {row: {column: rate}}."""
    out = {"base model": rates(base_pipe, concept, concept, draws, steps, seed=seed)}
    if embedding is not None:
        token = base_pipe.load_textual_inversion(embedding)
        try:
            out[f"textual inversion {token}"] = rates(base_pipe, token, concept, draws, steps, seed=seed)
        finally:
            base_pipe.unload_textual_inversion(token)
    if dreambooth is not None:
        tuned = StableDiffusion.from_pretrained(dreambooth, device=device)
        tuned.progress = False
        out["DreamBooth"] = rates(tuned, concept, concept, draws, steps, seed=seed)
    return {row: {k: v["rate"] for k, v in r.items()} for row, r in out.items()}


def markdown_table(result: dict) -> str:
    """The head-to-head (benchmarks/concepts.py's JSON) as the markdown table docs/adapters.md shows: each rate
    as a percentage with its 95% interval, then the file size and the training minutes."""
    rows = result["rows"]
    metrics = list(next(iter(rows.values()))["rates"])
    lines = ["| | " + " | ".join(metrics) + " | star prompts read as | file | training |", "|---" * (len(metrics) + 4) + "|"]
    for label, row in rows.items():
        cells = [f"{100 * r['rate']:.0f}% [{100 * r['low']:.0f}, {100 * r['high']:.0f}]" for r in row["rates"].values()]
        size = "–" if not row["file MB"] else f"{row['file MB']:.3g} MB"
        minutes = "–" if not row["train minutes"] else f"{row['train minutes']:g} min"
        drawn = row.get("star prompts drawn as", {})
        read = ", ".join(f"{shape} {n}" for shape, n in list(drawn.items())[:3]) + f" of {sum(drawn.values())}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {read} | {size} | {minutes} |")
    return "\n".join(lines)
