"""Upper bound for the star LoRA: fine-tune the *whole* U-Net on the LoRA's data, then count stars.

    python experiments/star_full_finetune.py WORK [STEPS] [LR] [EMA_DECAY] [BATCH]

The same data (finetune.lora_scenes: half stars, half ordinary scenes), captions, loss (Min-SNR-5),
schedule (train.lr_at) and bf16 autocast as `minisd train lora`, but every U-Net weight trainable instead
of LoRAs on them. If this also stops near the LoRA's 60%, no adapter can do better on this base model and
decoder; if it goes well past, the LoRA is what limits. Prints lora_by_size.py's counts for the last
weights and, with EMA_DECAY > 0, for their moving average; saves both U-Nets under WORK.
"""

import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minisd import StableDiffusion, shapes
from minisd.eval import concept_prompts, generate_for
from minisd.finetune import AdapterConfig, encode_all, lora_scenes
from minisd.train import Log, diffusion_loss, ema_update, lr_at, use_bf16

from lora_by_size import shapes_by_size, star_share

work = Path(sys.argv[1])
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 800
lr = float(sys.argv[3]) if len(sys.argv) > 3 else 2e-4
decay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.995
batch = int(sys.argv[5]) if len(sys.argv) > 5 else 16
cfg = AdapterConfig(steps=steps, lr=lr, batch=batch)
log = Log(work)
log(f"full U-Net fine-tune: steps {steps}, lr {lr}, EMA {decay}, batch {batch}")

pipe = StableDiffusion.from_pretrained("tiny", dtype=torch.float32)
pipe.progress = False
pipe.vae.requires_grad_(False), pipe.text_encoder.requires_grad_(False)
scenes = lora_scenes(cfg)
means, stds = encode_all(pipe, torch.stack([shapes.to_tensor(shapes.render(s)) for s in scenes]))
unet = pipe.unet.requires_grad_(True).train()
ema = copy.deepcopy(unet).requires_grad_(False) if decay > 0 else None
opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
alpha_bar = pipe.scheduler.alphas_cumprod()
rng, g = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
bf16, losses, t0 = use_bf16(cfg.bf16, torch.device("cpu")), [], time.time()
for step in range(steps):
    for group in opt.param_groups:
        group["lr"] = lr_at(step, steps, lr, cfg.warmup)
    idx = torch.randint(0, len(scenes), (batch,), generator=g)
    z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * pipe.vae.scaling_factor
    captions = ["" if rng.random() < cfg.caption_dropout else shapes.make_caption(copy.copy(scenes[i]), rng)
                for i in idx.tolist()]
    with torch.no_grad():
        context = pipe.text_encoder(pipe.tokenizer(captions, warn=False))
    t = torch.randint(0, len(alpha_bar), (batch,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = diffusion_loss(unet, z0, t, eps, context, alpha_bar, cfg.min_snr_gamma)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    if ema is not None:
        ema_update(ema, unet, step, decay)
    losses.append(loss.item())
    if step % 100 == 0 or step == steps - 1:
        log(f"step {step}: loss {np.mean(losses[-100:]):.4f} ({(time.time() - t0) / 60:.1f} min)")


def count(model, name):
    pipe.unet = model.eval()
    torch.save(model.state_dict(), work / f"unet_{name}.pt")
    prompts = concept_prompts("star")
    read = shapes_by_size(prompts, generate_for(pipe, prompts, 7.5))
    log(f"{name}: {sorted(read.items(), key=str)}; star shape {star_share(read):.3f}")


count(unet, "last")
if ema is not None:
    count(ema, "ema")
