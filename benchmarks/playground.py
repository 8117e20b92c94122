"""How quickly the playground answers, on the shipped tiny model: seconds from a changed control to new
pictures (sampling, decoding and painting), median of several changes each.

    python benchmarks/playground.py            # about a minute; prints a markdown table

The playground is `course.playground()` as the notebook and `minisd playground` build it: two prompts, the
star LoRA (fused, scale 0 while off) and the edge ControlNet loaded. Each change draws something not drawn
before (a new seed), except the scrubber, which only paints. No diffusers counterpart exists: these are
minisd's own seconds. The browser test (tests/browser) prints the same changes timed in Chromium.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minisd.shapes import course


def timed(change, repeats: int, before=None, after=None) -> float:
    """Median seconds of change(i); before(i) and after(i), untimed, around each."""
    seconds = []
    for i in range(repeats):
        if before:
            before(i)
        start = time.perf_counter()
        change(i)
        seconds.append(time.perf_counter() - start)
        if after:
            after(i)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    pg = course.playground()
    c = pg.controls
    seed = iter(range(1000, 100_000))

    def new_seed(_):
        c["seed"].value = next(seed)

    def turn(name, value):
        return lambda _: setattr(c[name], "value", value)

    rows = {}
    rows["new seed, two prompts"] = timed(new_seed, args.repeats)
    c["prompt_b"].value = ""
    rows["new seed, one prompt"] = timed(new_seed, args.repeats)
    for name, label in (("lora", "LoRA"), ("control", "ControlNet")):   # switched on at a seed not drawn yet
        rows[f"{label} switched on, one prompt"] = timed(turn(name, True), args.repeats, before=new_seed,
                                                          after=turn(name, False))
    rows["step scrubber (paint only)"] = timed(lambda i: setattr(pg.step, "value", 1 + i % pg.step.max), args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {pg.pipe}; "
          f"{c['steps'].value} steps, median of {args.repeats}\n")
    print("| change | seconds to new pictures |\n|---|---|")
    for name, s in rows.items():
        print(f"| {name} | {s:.2f} |")


if __name__ == "__main__":
    main()
