"""Does the starting noise's brightness overrule the prompt? (`minisd.shapes.brightness`)

    python benchmarks/brightness.py                  # -> docs/results/brightness.json, and a markdown table
    python benchmarks/brightness.py --models data/tiny data/tiny_v --k 0 -2 --background white

The 180 one-object prompts naming a white background, each from its own noise with the channel means set k
random-draw standard deviations toward black (k = 0: means removed), the model's own sampler, 25 steps (--steps), CFG 7.5:
the share of pictures whose background the analyser reads white, with Wilson's 95% interval. The JSON is
rewritten after each (model, k); run again to resume, --fresh to start over. About 2 minutes a cell on one thread.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minisd import StableDiffusion
from minisd.formats.files import atomic_write_text
from minisd.metrics import wilson_interval
from minisd.pipeline import DATA
from minisd.shapes import brightness

OUT = DATA.parent / "docs" / "results" / "brightness.json"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[str(DATA / n) for n in ("tiny", "tiny_v", "tiny_flow")])
    ap.add_argument("--k", nargs="+", type=float, default=[0, -1, -2, -3],
                    help="channel means in random-draw standard deviations (negative: toward black)")
    ap.add_argument("--background", default="white", choices=("white", "black"))
    ap.add_argument("--steps", type=int, default=25, help="sampling steps (an LCM: 4)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = {} if args.fresh or not out.exists() else json.loads(out.read_text())
    prompts = brightness.prompts(args.background)
    for folder in args.models:
        pipe = StableDiffusion.from_pretrained(folder)
        pipe.progress = False
        for k in args.k:
            key = f"{Path(folder).name} / {args.background} / k {k:+g}" + ("" if args.steps == 25 else f" / {args.steps} steps")
            if key in results:
                continue
            kept, _ = brightness.background_kept(pipe, prompts, k, steps=args.steps)
            low, high = wilson_interval(sum(kept), len(kept))
            results[key] = {"model": Path(folder).name, "steps": args.steps, "background": args.background, "k": k,
                            "kept": sum(kept) / len(kept), "low": low, "high": high, "n": len(kept)}
            atomic_write_text(out, json.dumps(results, indent=1) + "\n")
            print(f"{key}: {100 * results[key]['kept']:.0f}% ({100 * low:.0f}–{100 * high:.0f})", flush=True)
    print(table(results))
    return results


def name(r: dict) -> str:
    """A row's label: the model, and its steps where not 25."""
    return r["model"] + ("" if r.get("steps", 25) == 25 else f", {r['steps']} steps")


def table(results: dict) -> str:
    ks = sorted({r["k"] for r in results.values()}, reverse=True)
    models = list(dict.fromkeys(name(r) for r in results.values()))
    rows = ["| model | " + " | ".join(f"k = {k:+g}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for m in models:
        cells = []
        for k in ks:
            r = next((r for r in results.values() if name(r) == m and r["k"] == k), None)
            cells.append("–" if r is None else f"{100 * r['kept']:.0f}% ({100 * r['low']:.0f}–{100 * r['high']:.0f})")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
