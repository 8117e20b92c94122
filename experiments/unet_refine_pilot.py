"""Pilot: does the shipped U-Net bind colours better with more training? Continue from its weights
(same data, loss, caption dropout), two-object breakdown every 250 steps on the EMA weights."""
import copy, json, sys, time, numpy as np, torch
from pathlib import Path
from minisd import StableDiffusion, shapes
from minisd import train as T
from minisd import eval as ev
steps, lr, n = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
pipe = StableDiffusion.from_pretrained("tiny", dtype=torch.float32)
pipe.progress = False
log = T.Log(Path("runs/experiments/unet_refine"))
scenes = [shapes.make_scene(i) for i in range(n)]
images = torch.stack([torch.from_numpy(np.array(shapes.render(s))).permute(2, 0, 1) for s in scenes])
means, stds = T.cache_latents(pipe.vae, images, torch.device("cpu"), log)
sf = pipe.vae.scaling_factor
unet = pipe.unet.train().requires_grad_(True)
ema = copy.deepcopy(unet).requires_grad_(False).eval()
opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
alpha_bar = pipe.scheduler.alphas_cumprod()
rng, g = np.random.default_rng(5), torch.Generator().manual_seed(5)

def report(step):
    pipe.unet = ema
    t0 = time.time()
    res = ev.two_object_breakdown(pipe)
    pipe.unet = unet
    log(f"step {step}: two-object breakdown {json.dumps(res)} ({time.time() - t0:.0f}s)")

report(0)
losses, t0 = [], time.time()
for step in range(steps):
    for gr in opt.param_groups: gr["lr"] = lr * min(1, (step + 1) / 50)
    idx = torch.randint(0, n, (64,), generator=g)
    z0 = (means[idx].float() + stds[idx].float() * torch.randn(means[idx].shape, generator=g)) * sf
    with torch.no_grad():
        context = pipe.text_encoder(pipe.tokenizer(T.captions_for(scenes, idx.tolist(), rng, 0.1), warn=False))
    t = torch.randint(0, len(alpha_bar), (64,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    loss = T.diffusion_loss(unet, z0, t, eps, context, alpha_bar, 5.0)
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0); opt.step()
    T.ema_update(ema, unet, 1000 + step, 0.999)  # the shipped weights are already an average: start at full decay
    losses.append(loss.item())
    if (step + 1) % 50 == 0:
        log(f"step {step + 1}: loss {np.mean(losses[-50:]):.4f} ({(time.time() - t0) / (step + 1):.2f} s/step)")
    if (step + 1) % 250 == 0:
        report(step + 1)
        torch.save(ema.state_dict(), "runs/experiments/unet_refine_ema.pt")
