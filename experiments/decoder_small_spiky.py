"""Is the VAE decoder what stops the star LoRA's small stars, and can star-free pictures fix it?

    python experiments/decoder_small_spiky.py STEPS SHARE SPIKY RMAX [KMAX] [LR]

The shipped decoder reconstructs only 67% of ground-truth small stars (`minisd eval --vae`), and the
LoRA's small stars read as stars 8 of 30 times. This fine-tunes the shipped decoder (encoder frozen:
latents, scaling factor, U-Net and LoRA all unchanged) for STEPS steps as the recipe's last VAE phase
does (edge-weighted loss, half the latents over-contrasted up to KMAX, default 1.4), except that a
SHARE of each batch is clutter (shapes.clutter) with outer radii in [4, RMAX] px and a SPIKY share of
pointed polygons — 3, 4, 6, 7 or 8 points, never the star's 5: the base model still never sees a star.

Then, with the shipped and the new decoder, on the *same* latents (sampled once, cached in /tmp/dss):
the VAE's ceilings (`evaluate_vae`), the star LoRA's 60 prompts under three noise draws
(lora_by_size.py's counts), and `minisd eval`'s 240 prompts at CFG 7.5 (the base model must not lose).
"""

import json
import sys
from pathlib import Path

import torch

from minisd import StableDiffusion
from minisd.eval import concept_prompts, eval_prompts, evaluate_vae, generate_for, score
from minisd.generate import decode_latents, to_pil

from decoder_finetune import clutter_pictures, finetune_decoder, recipe_pictures
from lora_by_size import shapes_by_size, star_share

steps, share, spiky, rmax = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
kmax = float(sys.argv[5]) if len(sys.argv) > 5 else 1.4
lr = float(sys.argv[6]) if len(sys.argv) > 6 else 2e-4
cache = Path("/tmp/dss")
cache.mkdir(exist_ok=True)
pipe = StableDiffusion.from_pretrained("tiny")
pipe.progress = False
stars = concept_prompts("star") * 3
base = eval_prompts()

if not (cache / "latents.pt").is_file():
    with torch.no_grad():
        z_base = torch.stack(generate_for(pipe, base, 7.5, output_type="latent"))
        pipe.load_lora("data/tiny_star_lora", name="star")
        z_star = torch.stack([z for s in (0, 1000, 2000)
                              for z in generate_for(pipe, concept_prompts("star"), 7.5, seed=s, output_type="latent")])
        pipe.unload_lora("star")
    torch.save({"base": z_base, "star": z_star}, cache / "latents.pt")
z = torch.load(cache / "latents.pt")


def report(label: str) -> dict:
    pipe.vae.eval()
    with torch.no_grad():
        ceiling = evaluate_vae(pipe)
        read = shapes_by_size(stars, to_pil(decode_latents(pipe, z["star"])))
        one = score(base, to_pil(decode_latents(pipe, z["base"])))
    row = {"vae ceiling": {s: {k: round(v, 3) for k, v in r.items()} for s, r in ceiling.items()},
           "LoRA stars, 3 draws": {f"{a} {b}": v for (a, b), v in sorted(read.items(), key=str)},
           "LoRA star shape": round(star_share(read), 3),
           "base CFG 7.5": {k: round(v, 3) for k, v in one["one"].items()} | {"two: both": round(one["two"]["both"], 3)}}
    print(label, json.dumps(row), flush=True)
    return row


if not (cache / "baseline.json").is_file():
    (cache / "baseline.json").write_text(json.dumps(report("shipped decoder")))
if steps == 0:
    sys.exit()

cfg, images = recipe_pictures(cache)
extra = clutter_pictures(len(images) // 4, 910_000_000, spiky, (4, rmax))
vae = finetune_decoder(pipe.vae, images, extra, steps=steps, lr=lr, batch=cfg.vae_batch, n_clutter=round(cfg.vae_batch * share),
                       kmax=kmax, share=0.5, edge_weight=cfg.vae_edge_weight, seed=12, log_every=50)
name = f"s{steps}_share{share:g}_spiky{spiky:g}_r{rmax:g}_k{kmax:g}_lr{lr:g}"
torch.save(vae.state_dict(), cache / f"vae_{name}.pt")
report(name)
