"""Prompt adherence and diversity against a sampling setting (steps, sampler, guidance scale).

A sweep scores every picture on its own, so a rate comes with its uncertainty:

    records = picture_records(pipe, prompts, seeds=(0, 1000), sampler="ddim", steps=8)
    rate(records, "colour")      # -> (share right, 95% low, 95% high, pictures judged)
    diversity(records)           # -> (share of differing pairs among correct pictures, low, high, pairs)

`benchmarks/sampling_sweeps.py` runs the full sweeps behind notebooks 07 and 08 and stores the
records in docs/results/; the notebooks load them and recompute a part live.
"""

from __future__ import annotations

from itertools import combinations

from ..metrics import wilson_interval
from .analyser import analyse, generate_for, judge, parse
from .world import BASE_SHAPES, COLOURS, SIZES


def open_prompts() -> list[str]:
    """One-object prompts that name colour, shape and size but leave position and background open
    (36): room for the model to vary, which `diversity` measures."""
    return [f"a {size} {colour} {shape}" for colour in COLOURS for shape in BASE_SHAPES for size in SIZES]


def picture_records(pipe, prompts: list[str], seeds=(0,), **settings) -> list[dict]:
    """One record per (prompt, seed): `judge`'s verdicts and, for one object, where and how the object
    of the requested colour was drawn. Seed s gives prompt i the noise of seed s + i (`generate_for`);
    `settings` go to `generate_for` (guidance_scale, steps, sampler)."""
    return [r for seed in seeds for r in records_of(prompts, generate_for(pipe, prompts, seed=seed, **settings), seed)]


def records_of(prompts: list[str], images: list, seed: int) -> list[dict]:
    """`picture_records` for pictures already made (prompt i from the noise of seed + i): the scoreboard
    judges the very pictures its FID measures, generated once."""
    records = []
    for prompt, image in zip(prompts, images):
        a = analyse(image)
        wanted, _ = parse(prompt)
        obj = a.find(wanted[0].colour) if len(wanted) == 1 else None
        layout = [obj.position, obj.size, a.background] if obj is not None else None
        records.append({"prompt": prompt, "seed": seed, "ok": judge(prompt, image), "layout": layout})
    return records


def rate(records: list[dict], factor: str) -> tuple[float, float, float, int]:
    """The share of pictures right on `factor` (pictures whose prompt does not ask for it are left
    out), with Wilson's 95% interval and the number of pictures judged. `factor` "all": one-object
    pictures right on every factor their prompt asks for."""
    if factor == "all":
        verdicts = [all(r["ok"].values()) for r in records if "both" not in r["ok"]]
    else:
        verdicts = [r["ok"][factor] for r in records if factor in r["ok"]]
    if not verdicts:
        raise ValueError(f"factor = {factor!r}; no record judges it (factors: colour, shape, position, size, background, both, colours, all)")
    low, high = wilson_interval(sum(verdicts), len(verdicts))
    return sum(verdicts) / len(verdicts), low, high, len(verdicts)


def diversity(records: list[dict]) -> tuple[float, float, float, int]:
    """Among pictures of the same prompt that are right on every factor judged, the share of pairs
    (different seeds) drawn in a different layout (position, size or background), with Wilson's 95%
    interval and the number of pairs. A wrong picture never counts as diverse: it is left out."""
    correct: dict[str, list] = {}
    for r in records:
        if r["layout"] is not None and all(r["ok"].values()):
            correct.setdefault(r["prompt"], []).append(tuple(r["layout"]))
    pairs = [a != b for layouts in correct.values() for a, b in combinations(layouts, 2)]
    if not pairs:
        return 0.0, 0.0, 1.0, 0
    low, high = wilson_interval(sum(pairs), len(pairs))
    return sum(pairs) / len(pairs), low, high, len(pairs)


def agreement(live: list[dict], stored: list[dict]) -> float:
    """The share of live records whose verdicts equal the stored record of the same prompt and seed
    (1.0 on the machine that stored them; float rounding elsewhere can flip a borderline picture)."""
    index = {(r["prompt"], r["seed"]): r["ok"] for r in stored}
    missing = [(r["prompt"], r["seed"]) for r in live if (r["prompt"], r["seed"]) not in index]
    if missing:
        raise ValueError(f"live record {missing[0]!r} is not among the stored records; expected a subset")
    return sum(index[(r["prompt"], r["seed"])] == r["ok"] for r in live) / len(live)
