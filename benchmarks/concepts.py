"""Three ways to teach the tiny model `star`, head to head: the same 60 held-out star prompts and 60 ordinary
prompts, under the same noise draws, for the base model, the textual inversion, the LoRA, DreamBooth with
and without prior preservation, and DreamBooth-LoRA. Writes docs/results/concepts.json (read by docs/adapters.md and notebook 15).

    python benchmarks/concepts.py                      # the shipped files, 3 draws (2-5 min a row on 2 cores)
    python benchmarks/concepts.py --draws 1 --json /tmp/c.json
    python benchmarks/concepts.py --time               # only the training minutes, each kind alone (6-9 min)
    python benchmarks/concepts.py --only DreamBooth-LoRA   # re-measure these rows, keep the JSON's others

The draws are seeded, so a row measured again with the same files gives the same rates; --only keeps the other
rows' rates from the JSON (their file sizes and training minutes are read afresh).

The training minutes are measured the same way for every kind (--time, stored in the JSON by the next full
run): each loop run alone for 30 steps with the shipped settings; its minutes are the setup (rendering,
encoding, the prior's pictures) plus its own seconds per step times the shipped number of steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

import torch

from minisd import StableDiffusion
from minisd.formats.files import atomic_write_text
from minisd.shapes.concept_eval import markdown_table, rates, size_mb

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


TIMED_STEPS = 30
ROWS = ("base model", "textual inversion", "LoRA", "DreamBooth", "DreamBooth, no prior", "DreamBooth-LoRA")


TIMED = {"textual-inversion": ("textual-inversion", {}), "lora": ("lora", {}), "dreambooth": ("dreambooth", {}),
         "dreambooth, no prior": ("dreambooth", {"prior_loss_weight": 0.0}), "dreambooth-lora": ("dreambooth-lora", {})}


def time_training() -> dict[str, dict]:
    """Each kind's loop alone for TIMED_STEPS steps (shipped settings otherwise, in a temporary folder): its setup
    seconds, seconds per step, and the minutes the shipped number of steps would take."""
    import tempfile

    from minisd.shapes.finetune import AdapterConfig, train_adapter

    out = {}
    for name, (kind, changes) in TIMED.items():
        shipped = AdapterConfig.of(kind, **changes)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = AdapterConfig.of(kind, **changes, steps=TIMED_STEPS, checkpoint_minutes=60.0, work=tmp,
                                   out=f"{tmp}/out")
            t0 = time.time()
            train_adapter(cfg)
            total = time.time() - t0
            per_step = json.loads((Path(tmp) / "out" / "training.json").read_text())["minutes"]["seconds_per_step"]
        setup = total - per_step * TIMED_STEPS
        out[name] = {"setup_seconds": round(setup, 1), "seconds_per_step": round(per_step, 3), "steps": shipped.steps,
                     "minutes": round((setup + per_step * shipped.steps) / 60, 1)}
        print(f"{name}: {out[name]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "docs" / "results" / "concepts.json"))
    ap.add_argument("--embedding", default=str(DATA / "tiny_star_embedding"))
    ap.add_argument("--lora", default=str(DATA / "tiny_star_lora"))
    ap.add_argument("--dreambooth", default=str(DATA / "tiny_star_dreambooth"))
    ap.add_argument("--dreambooth-noprior", default=str(DATA / "tiny_star_dreambooth_noprior"))
    ap.add_argument("--dreambooth-lora", default=str(DATA / "tiny_star_dreambooth_lora"))
    ap.add_argument("--time", action="store_true", help="measure the training minutes only, into --json's file")
    ap.add_argument("--only", nargs="+", metavar="ROW", choices=ROWS, default=None,
                    help="measure only these rows (" + ", ".join(repr(r) for r in ROWS) + "), keep the others")
    args = ap.parse_args(argv)
    if args.time:
        old = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
        old["training"] = {"timed_steps": TIMED_STEPS, "kinds": time_training(), "torch_threads": torch.get_num_threads(),
                           "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}
        atomic_write_text(args.json, json.dumps(old, indent=1))
        return old
    timed = json.loads(Path(args.json).read_text()).get("training", {}) if Path(args.json).is_file() else {}
    minutes = {kind: v["minutes"] for kind, v in timed.get("kinds", {}).items()}
    if args.draws < 1:
        raise SystemExit(f"--draws must be at least 1, got {args.draws}")
    kept = {}  # --only: the rows not measured again, from the JSON
    if args.only:
        old = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {"rows": {}}
        if old.get("draws") != args.draws:
            raise SystemExit(f"--only keeps rows of {args.json}, measured with {old.get('draws')} draws, "
                             f"not --draws {args.draws}")
        kept = {k: v for k, v in old["rows"].items() if k not in args.only}
        if missing := [r for r in ROWS if r not in args.only and r not in kept]:
            raise SystemExit(f"--only: {args.json} has no row {missing[0]!r} to keep; measure it too")

    base = StableDiffusion.from_pretrained(DATA / "tiny")
    base.progress = False
    rows, t0 = {}, time.time()

    def measure(label: str, pipe, word: str, files: dict) -> None:
        if label in kept:
            rows[label] = {**kept[label], **files}
            return
        t, drawn = time.time(), Counter()
        rows[label] = {"rates": rates(pipe, word, draws=args.draws, drawn=drawn), **files,
                       "star prompts drawn as": dict(drawn.most_common())}
        print(f"{label}: {time.time() - t:.0f}s " + ", ".join(f"{k} {100 * v['rate']:.0f}%"
                                                              for k, v in rows[label]["rates"].items()), flush=True)

    measure("base model", base, "star", {"trained": "nothing", "file MB": 0.0, "train minutes": 0.0})
    token = base.load_textual_inversion(args.embedding)
    measure("textual inversion", base, token,
            {"trained": f"{token}: {base.textual_inversions[token].vectors.numel()} numbers",
             "file MB": size_mb(Path(args.embedding) / "learned_embeds.safetensors"),
             "train minutes": minutes.get("textual-inversion")})
    base.unload_textual_inversion()
    base.load_lora(args.lora, name="star")
    measure("LoRA", base, "star", {"trained": "rank-64 LoRA on every U-Net layer",
                                   "file MB": size_mb(Path(args.lora) / "pytorch_lora_weights.safetensors"),
                                   "train minutes": minutes.get("lora")})
    base.unload_lora("star")
    for label, folder, m in (("DreamBooth", args.dreambooth, minutes.get("dreambooth")),
                             ("DreamBooth, no prior", args.dreambooth_noprior, minutes.get("dreambooth, no prior"))):
        tuned = StableDiffusion.from_pretrained(folder)
        tuned.progress = False
        measure(label, tuned, "star", {"trained": "the whole U-Net", "file MB": size_mb(Path(folder) / "unet"),
                                       "train minutes": m})
    base.load_lora(args.dreambooth_lora, name="star")
    measure("DreamBooth-LoRA", base, "star",
            {"trained": "rank-64 LoRA on every U-Net layer, DreamBooth's prior",
             "file MB": size_mb(Path(args.dreambooth_lora) / "pytorch_lora_weights.safetensors"),
             "train minutes": minutes.get("dreambooth-lora")})
    base.unload_lora("star")

    result = {"training": timed, "draws": args.draws, "steps": 25, "guidance_scale": 7.5, "sampler": "ddim", "rows": rows,
              "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "torch": torch.__version__},
              "seconds": round(time.time() - t0), "measured": [r for r in ROWS if r not in kept]}
    atomic_write_text(args.json, json.dumps(result, indent=1))
    print(markdown_table(result))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
