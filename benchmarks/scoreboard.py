"""The scoreboard of the shapes-world models (`minisd.shapes.scoreboard`), on this machine:

    python benchmarks/scoreboard.py                       # -> docs/results/scoreboard.json, and a markdown table
    python benchmarks/scoreboard.py --models data/tiny data/tiny_flow --draws 2
    python benchmarks/scoreboard.py --quick               # 24 prompts, 1 draw -> docs/results/scoreboard_quick.json

Default models: data/tiny and whichever of data/tiny_v, data/tiny_flow, data/tiny_lcm, data/tiny_lcm_v,
data/tiny_mmdit exist; for each, the settings of its kind (`scoreboard.SETTINGS`): adherence with Wilson
intervals, FID/KID against renders, seconds per picture. The JSON is rewritten after each (model, setting): run it again to resume
(entries present are skipped), --fresh to start over. Run with OMP_NUM_THREADS set: the thread count
goes into every entry beside its seconds per picture.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minisd.shapes import scoreboard as sb
from minisd.shapes.analyser import eval_prompts

QUICK_PROMPTS = 24  # every 10th evaluation prompt: 18 one-object, 6 two-object


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help="model folders (default: the shipped ones)")
    ap.add_argument("--draws", type=int, default=None, help="noise draws per prompt (default 2; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_PROMPTS} prompts, 1 draw, its own --out")
    ap.add_argument("--out", default=None, help="the JSON (default docs/results/scoreboard.json, or "
                    "scoreboard_quick.json with --quick)")
    ap.add_argument("--fresh", action="store_true", help="start over instead of resuming --out")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    draws = args.draws if args.draws is not None else 1 if args.quick else 2
    if draws < 1:
        raise SystemExit(f"--draws must be at least 1, got {draws}")
    prompts = eval_prompts()[:: len(eval_prompts()) // QUICK_PROMPTS] if args.quick else eval_prompts()
    out = Path(args.out) if args.out else sb.OUT.with_name("scoreboard_quick.json") if args.quick else sb.OUT
    models = [Path(m) for m in args.models] if args.models else sb.default_models()
    print(f"{len(models)} model(s), {len(prompts)} prompts × {draws} draw(s), {torch.get_num_threads()} thread(s) "
          f"-> {out}", flush=True)
    board = sb.run(models, draws, prompts, out, args.fresh, args.device)
    print(sb.format_board(board))
    return board


if __name__ == "__main__":
    main()
