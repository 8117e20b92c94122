"""How the shipped VAE got the recipe's third VAE phase (session 9): run `train_vae`'s over-contrast
phase on the shipped decoder and write the result, and its minutes, into data/tiny.

    python experiments/ship_contrast_phase.py [WORK]        # WORK: default runs/cpu7

The shipped model is run `cpu6` of `minisd train all`, whose recipe had no over-contrast phase then;
its checkpoints are not on this machine, only the shipped (fp16) weights. This does what `minisd
train all` now does after the decoder-only phase, from there: it writes a VAE checkpoint at step
vae_steps + vae_decoder_steps (2,600) holding the shipped VAE and a fresh AdamW, lets `train_vae`
resume it with the recipe's settings (so it runs exactly the `vae_contrast_steps` steps of the
recipe, encoder frozen, the latents unchanged), saves the VAE into data/tiny in fp16, adds the
phase's measured minutes and settings to data/tiny/training.json, and redraws the sample grid of
docs/images/tiny_samples_cpu_training.png (the recipe's final grid: SAMPLE_PROMPTS, 25 steps,
seed 0). Run it with nothing else on the machine: its minutes go into the recipe's total.
"""

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from minisd import StableDiffusion
from minisd.train import SAMPLE_PROMPTS, Log, TrainConfig, grid, make_data, model_config, save_checkpoint, train_vae

work = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cpu7")
work.mkdir(parents=True, exist_ok=True)
record_path = Path("data/tiny/training.json")
record = json.loads(record_path.read_text())
assert "vae_contrast_steps" not in record["config"], "data/tiny already has the over-contrast phase"
cfg = replace(TrainConfig(), **{k: v for k, v in record["config"].items() if k in asdict(TrainConfig())})
cfg = replace(cfg, work=str(work), vae_contrast_steps=TrainConfig.vae_contrast_steps, vae_contrast=TrainConfig.vae_contrast)
log = Log(work)
log(f"config: {json.dumps(asdict(cfg))}")
pipe = StableDiffusion.from_pretrained("data/tiny")
pipe.progress = False
vae = pipe.vae.float()
start = cfg.vae_steps + cfg.vae_decoder_steps
save_checkpoint(work / "vae.pt", model=vae.state_dict(), opt=torch.optim.AdamW(vae.parameters()).state_dict(),
                step=start)
images, _ = make_data(cfg, log)
mcfg = model_config(pipe.tokenizer)
mcfg = replace(mcfg, vae=pipe.vae.config)
t0 = time.time()
trained = train_vae(cfg, mcfg, images, log)
minutes = (time.time() - t0) / 60
log(f"vae: the over-contrast phase, {cfg.vae_contrast_steps} steps, in {minutes:.2f} min")
pipe.vae.load_state_dict(trained.state_dict())
pipe.vae.eval()
imgs = pipe(SAMPLE_PROMPTS, num_inference_steps=cfg.sample_steps, seed=0, output_type="pt", num_images_per_prompt=2)
grid(imgs * 2 - 1).save("docs/images/tiny_samples_cpu_training.png")
pipe.to("cpu", torch.float16)
pipe.save_pretrained("data/tiny")

record = json.loads(record_path.read_text())  # save_pretrained leaves training.json alone; re-read to be sure
record["config"] = asdict(replace(cfg, work=record["config"]["work"]))
record["minutes"]["vae"] = round(record["minutes"]["vae"] + minutes, 2)
record["total_minutes"] = round(sum(record["minutes"].values()), 1)
record["vae_contrast_phase"] = (f"run separately by experiments/ship_contrast_phase.py on the shipped decoder "
                                f"(run cpu6's checkpoints were gone): {cfg.vae_contrast_steps} steps, "
                                f"{minutes:.2f} min, added to the VAE's minutes")
record_path.write_text(json.dumps(record, indent=1))
print(f"over-contrast phase: {minutes:.2f} min; recipe total now {record['total_minutes']} min")
