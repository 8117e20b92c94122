"""Training adapters on a frozen model: a LoRA that teaches a new concept, a ControlNet that follows a map.

    minisd train lora                      # teach the tiny model `star` (never in its training data)
    minisd train controlnet                # a ControlNet that places objects where an edge map says
    minisd train inpaint                   # a 9-channel inpainting U-Net, as SD's inpainting model was made

All three are the base recipe's U-Net loop (train.py) on the finished model:

    LoRA        trainable: A, B (W' = W + (α/r)·BA) on every Linear and Conv2d of the U-Net (attention,
                feed-forward, the ResBlocks' convs, ...: LoCon's "all layers"), optionally the text encoder's
                data: half pictures of the new concept, half ordinary scenes (prior preservation, as
                DreamBooth does: the other shapes must stay right)
                loss: weighted onto a star's notches and every object's outline (loss_weights)
    ControlNet  trainable: the encoder copy, the hint encoder and the zero convs
                data: (control map, picture, caption); captions that never say where things are, half
                of them dropped to "" (Zhang et al. 2023, §3.3): only the map can tell the layout
    inpainting  trainable: the whole U-Net, its first conv widened from 4 to 9 input channels (z_t, the
                mask, the masked picture's latents), the 5 new ones zero-initialised, so it starts as the
                base model (as runwayml's SD inpainting model was made from SD 1.2)
                data: pictures with random masks (boxes, an object's box, or everything: 25%)

Each writes checkpoints and resumes, logs to <work>/log.txt, and saves what the course ships:
the LoRA in diffusers/PEFT and kohya layouts, the ControlNet as a diffusers ControlNetModel folder,
the inpainting model as a whole diffusers pipeline folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapters import lora as lora_lib
from . import world
from ..adapters.controlnet import ControlNet, save_controlnet
from ..pipeline import StableDiffusion
from .train import Log, diffusion_loss, edge_map, lr_at, resume, save_checkpoint, use_bf16


@dataclass(frozen=True)
class AdapterConfig:
    kind: str = "lora"                # "lora" or "controlnet"
    model: str = "tiny"               # the frozen base model
    out: str = ""                     # default: data/tiny_star_lora or data/tiny_controlnet_edges
    work: str = ""                    # default: runs/lora or runs/controlnet
    device: str = "cpu"
    seed: int = 0
    n_images: int = 4000
    steps: int = 800                  # the star LoRA: 1,600 steps did no better (experiments/star_lora_trials.md)
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 20
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    bf16: str = "auto"                # bfloat16 autocast, as for the base model (train.use_bf16)
    # LoRA
    concept: str = "star"             # the new shape; half of the training pictures show it
    rank: int = 64
    alpha: float = 64.0
    # every Linear and Conv2d of the U-Net (kohya's LoCon "all layers"): a new *shape*, drawn at 3.5 latent
    # cells when small, needs capacity everywhere. Attention alone learnt `star` far more slowly; kohya's
    # transformer set + ResBlock convs at rank 16 drew 2 small stars of 30, this 8 (62% stars against 53%)
    targets: str = ("to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,"
                    "conv,conv_in,conv_out,time_emb_proj,linear_1,linear_2")
    # and optionally the text encoder's (kohya's `lora_te_`), for a word the frozen CLIP never learnt. For the
    # star it bought nothing (53% star shape with or without; 62% and 62% on every layer): drawing the shape, not
    # naming it, is the hard part
    te_targets: str = ""              # e.g. "q_proj,k_proj,v_proj,out_proj,fc1,fc2"; "" = the U-Net only
    te_lr_scale: float = 1.0          # the text encoder's rate relative to --lr
    # Where the loss looks. A plain loss averages over every latent number; a small star's five notches are about
    # 4 of the 256 cells and weigh nothing, so the base model's habit of filling them in costs the LoRA nothing to
    # keep. Each cell's squared error is weighted 1 + notch_weight · its share of notch (inside an object's convex
    # hull, outside the object: world.notches, none for the convex base shapes) + outline_weight · its share of
    # outline (train.edge_map, every object: the ordinary half's shapes are guarded as hard as the stars'
    # notches), and each picture's weights are scaled to average 1, so star pictures do not outweigh the
    # ordinary half. 0, 0: the plain loss. Small stars drawn: 21 of 90 plain, 50-58 so (star shape 62 -> 76-81%,
    # base shapes 94-97%); notches alone cut notches into triangles too (experiments/star_lora_trials.md, session 13)
    notch_weight: float = 300.0
    outline_weight: float = 100.0
    # ControlNet
    control: str = "edges"            # "edges" or "mask" (world.control_map)
    checkpoint_minutes: float = 5.0

    def paths(self) -> tuple[Path, Path]:
        name = {"lora": f"tiny_{self.concept}_lora", "controlnet": f"tiny_controlnet_{self.control}",
                "inpaint": "tiny_inpaint"}[self.kind]
        return Path(self.out or f"data/{name}"), Path(self.work or f"runs/{self.kind}")


def lora_scenes(cfg: AdapterConfig) -> list[world.Scene]:
    """Half the scenes made of the concept only, half ordinary (base shapes): learn one, forget none."""
    rng_seed = 50_000_000 + cfg.seed * 1_000_000  # far from the base training seeds
    return [world.make_scene(rng_seed + i, shapes=(cfg.concept,) if i % 2 == 0 else world.BASE_SHAPES)
            for i in range(cfg.n_images)]


def controlnet_scenes(cfg: AdapterConfig) -> list[world.Scene]:
    return [world.make_scene(60_000_000 + cfg.seed * 1_000_000 + i) for i in range(cfg.n_images)]


def inpaint_scenes(cfg: AdapterConfig) -> list[world.Scene]:
    return [world.make_scene(80_000_000 + cfg.seed * 1_000_000 + i) for i in range(cfg.n_images)]


def random_masks(scenes: list[world.Scene], idx: list[int], rng: np.random.Generator) -> torch.Tensor:
    """(B, 1, 64, 64) of 0/1, white = repaint: a quarter everything (the model must still draw from
    text alone), half one object's box grown by a few pixels (repaint an object), a quarter a random box."""
    masks = torch.zeros(len(idx), 1, world.SIZE, world.SIZE)
    for b, i in enumerate(idx):
        r = rng.random()
        if r < 0.25:
            masks[b] = 1
            continue
        if r < 0.75:
            x0, y0, x1, y1 = scenes[i].objects[int(rng.integers(len(scenes[i].objects)))].bbox
            grow = int(rng.integers(2, 7))
            x0, y0, x1, y1 = x0 - grow, y0 - grow, x1 + grow, y1 + grow
        else:
            w, h = rng.integers(12, 48, size=2)
            x0, y0 = int(rng.integers(0, world.SIZE - w)), int(rng.integers(0, world.SIZE - h))
            x1, y1 = x0 + int(w), y0 + int(h)
        masks[b, :, max(y0, 0):y1, max(x0, 0):x1] = 1
    return masks


def inpainting_unet(unet):
    """The base U-Net with 9 input channels: conv_in's new weights are zero, so at the start it ignores
    the mask and masked picture and predicts exactly what the base model does."""
    from dataclasses import replace as dc_replace

    from ..models.unet import UNet

    new = UNet(dc_replace(unet.config, in_channels=9)).to(unet.conv_in.weight.device)
    state = unet.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, torch.zeros(w.shape[0], 5, *w.shape[2:], dtype=w.dtype, device=w.device)], 1)
    new.load_state_dict(state)
    return new


class _Inpainting(torch.nn.Module):
    """The 9-channel U-Net as ε_θ(z_t, t, c): the mask and masked-picture latents ride along on channels."""

    def __init__(self, unet, extra: torch.Tensor):
        super().__init__()
        self.unet, self.extra = unet, extra

    def forward(self, z_t, t, context, control=None):
        return self.unet(torch.cat([z_t, self.extra], dim=1), t, context)


def loss_weights(scenes: list[world.Scene], images: torch.Tensor, side: int, notch: float, outline: float,
                 log=print) -> torch.Tensor:
    """(N, 1, side, side): each latent cell's weight in the LoRA's loss (AdapterConfig.notch_weight): 1 + notch ·
    its share of notch + outline · its share of outline, scaled to average 1 over each picture."""
    notches = torch.from_numpy(np.stack([world.notches(s, side) for s in scenes]))[:, None]
    outlines = F.avg_pool2d(edge_map(images), images.shape[-1] // side)
    w = 1 + notch * notches + outline * outlines
    notched = int((notches.flatten(1) > 0).any(1).sum())
    log(f"loss weights: 1 + {notch:g} · notch + {outline:g} · outline, averaging 1 a picture; {notched} of "
        f"{len(scenes)} pictures with notches, {notches.sum() / len(scenes):.1f} notch and "
        f"{outlines.sum() / len(scenes):.1f} outline cells a picture")
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


@torch.no_grad()
def encode_all(pipe: StableDiffusion, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), 250):
        post = pipe.vae.encode(images[i:i + 250].to(pipe.device, pipe.dtype))
        means.append(post.mean.float().cpu()), stds.append(post.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


class _Controlled(torch.nn.Module):
    """U-Net + ControlNet as one ε_θ(z_t, t, c): the ControlNet's residuals fed to the U-Net."""

    def __init__(self, unet, controlnet: ControlNet, hint: torch.Tensor):
        super().__init__()
        self.unet, self.controlnet, self.hint = unet, controlnet, hint

    def forward(self, z_t, t, context, control=None):
        return self.unet(z_t, t, context, control=self.controlnet(z_t, t, context, self.hint))


def train_adapter(cfg: AdapterConfig) -> Path:
    """The one loop for both adapters; returns where the result was saved."""
    out, work = cfg.paths()
    log = Log(work)
    log(f"config: {json.dumps(asdict(cfg))}")
    device = torch.device(cfg.device)
    pipe = StableDiffusion.from_pretrained(cfg.model, device=device, dtype=torch.float32)
    pipe.progress = False
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    torch.manual_seed(cfg.seed)

    t0 = time.time()
    scenes = {"lora": lora_scenes, "controlnet": controlnet_scenes, "inpaint": inpaint_scenes}[cfg.kind](cfg)
    images = torch.stack([world.to_tensor(world.render(s)) for s in scenes])
    means, stds = encode_all(pipe, images)
    controls = None
    if cfg.kind == "controlnet":
        controls = torch.stack([world.to_tensor(world.control_map(s, cfg.control)) * 0.5 + 0.5 for s in scenes])
    log(f"data: {len(scenes)} scenes rendered and encoded in {time.time() - t0:.0f}s")

    weights = None  # the LoRA's loss weight per latent cell (loss_weights); None: the plain loss
    if cfg.kind == "lora":
        roots = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        loras = lora_lib.inject(roots, "train", cfg.rank, cfg.alpha, cfg.targets.split(","))
        te_loras = {}
        if cfg.te_targets:
            te_loras = lora_lib.inject(roots, "train", cfg.rank, cfg.alpha, cfg.te_targets.split(","), root="text_encoder")
        module = torch.nn.ModuleDict({k.replace(".", "/"): v for k, v in {**loras, **te_loras}.items()})
        log(f"LoRA rank {cfg.rank} on {len(loras)} U-Net layers: {lora_lib.parameter_count(loras):,} trainable "
            f"parameters ({lora_lib.parameter_count(loras) / sum(p.numel() for p in pipe.unet.parameters()):.1%} of the "
            f"U-Net)" + (f", and on {len(te_loras)} text-encoder layers: {lora_lib.parameter_count(te_loras):,}"
                         if te_loras else ""))
        if cfg.notch_weight or cfg.outline_weight:
            weights = loss_weights(scenes, images, means.shape[-1], cfg.notch_weight, cfg.outline_weight, log)
    elif cfg.kind == "controlnet":
        hint = tuple(16 * 2**i for i in range(int(math.log2(pipe.vae.config.downsampling)) + 1))
        module = ControlNet.from_unet(pipe.unet, hint).to(device)
        module.requires_grad_(True).train()
        log(f"ControlNet with hint encoder {hint}: {sum(p.numel() for p in module.parameters()):,} trainable parameters")
    elif cfg.kind == "inpaint":
        module = inpainting_unet(pipe.unet)
        module.requires_grad_(True).train()
        log(f"inpainting U-Net: conv_in 4 -> 9 input channels, {sum(p.numel() for p in module.parameters()):,} "
            f"trainable parameters")
    else:
        raise ValueError(f"kind must be 'lora', 'controlnet' or 'inpaint', got {cfg.kind!r}")
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": params, "lr_scale": 1.0}]
    if cfg.kind == "lora" and te_loras:
        te = {id(p) for lo in te_loras.values() for p in lo.parameters()}
        groups = [{"params": [p for p in params if id(p) not in te], "lr_scale": 1.0},
                  {"params": [p for p in params if id(p) in te], "lr_scale": cfg.te_lr_scale}]
    if cfg.kind == "inpaint":  # the new input channels start at zero and have the most to learn: 10× the rate
        first = {id(p) for p in module.conv_in.parameters()}
        groups = [{"params": [p for p in params if id(p) not in first], "lr_scale": 1.0},
                  {"params": list(module.conv_in.parameters()), "lr_scale": 10.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0 if cfg.kind == "lora" else 0.01)
    start = resume(work / f"{cfg.kind}.pt", log, model=module, opt=opt)

    alpha_bar = pipe.scheduler.alphas_cumprod().to(device)
    dropout = 0.5 if cfg.kind == "controlnet" else cfg.caption_dropout
    rng = np.random.default_rng(cfg.seed + start)
    g = torch.Generator().manual_seed(cfg.seed + start)
    losses, last_save = [], time.time()
    bf16 = use_bf16(cfg.bf16, device)
    log(f"{cfg.kind}: {'bfloat16 autocast' if bf16 else 'float32'}")
    bar = tqdm(range(start, cfg.steps), desc=cfg.kind, initial=start, total=cfg.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup) * group["lr_scale"]
        idx = torch.randint(0, len(scenes), (cfg.batch,), generator=g)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)).to(device) * pipe.vae.scaling_factor
        # ControlNet: captions never say where things are, and half are empty — only the map knows
        captions = ["" if rng.random() < dropout else world.make_caption(copy.copy(scenes[i]), rng,
                                                                          positions=cfg.kind != "controlnet")
                    for i in idx.tolist()]
        with torch.set_grad_enabled(cfg.kind == "lora" and bool(cfg.te_targets)):  # frozen unless it has LoRAs
            context = pipe.text_encoder(pipe.tokenizer(captions, warn=False).to(device))
        t = torch.randint(0, len(alpha_bar), (cfg.batch,), generator=g).to(device)
        eps = torch.randn(z0.shape, generator=g).to(device)
        unet = pipe.unet
        if cfg.kind == "controlnet":  # the ControlNet sees the same z_t as the U-Net it steers
            hint = controls[idx].to(device)
            unet = _Controlled(pipe.unet, module, hint)
        elif cfg.kind == "inpaint":  # what the pipeline feeds it: the mask and the masked picture's latents
            mask = random_masks(scenes, idx.tolist(), rng)
            with torch.no_grad():
                masked = pipe.vae.encode((images[idx] * (mask < 0.5)).to(device)).sample(g)
            f = pipe.vae.config.downsampling
            mask_latent = torch.nn.functional.interpolate(mask, size=(world.SIZE // f, world.SIZE // f)).to(device)
            unet = _Inpainting(module, torch.cat([mask_latent, masked * pipe.vae.scaling_factor], dim=1))
        weight = None if weights is None else weights[idx].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # the weights stay fp32
            loss = diffusion_loss(unet, z0, t, eps, context, alpha_bar, cfg.min_snr_gamma, weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"{cfg.kind} step {step}: loss {np.mean(losses[-100:]):.4f}, lr {opt.param_groups[0]['lr']:.2e}")
        if time.time() - last_save > cfg.checkpoint_minutes * 60:
            save_checkpoint(work / f"{cfg.kind}.pt", model=module.state_dict(), opt=opt.state_dict(), step=step + 1)
            last_save = time.time()
    save_checkpoint(work / f"{cfg.kind}.pt", model=module.state_dict(), opt=opt.state_dict(), step=cfg.steps)
    module.eval()

    out.mkdir(parents=True, exist_ok=True)
    if cfg.kind == "lora":
        meta = {"minisd_concept": cfg.concept, "ss_base_model_version": "minisd_tiny"}
        everything = {**loras, **te_loras}
        # fp16, as the base model and most LoRA files in circulation are
        lora_lib.save_lora(everything, out, "peft", meta, torch.float16)                          # diffusers/PEFT
        lora_lib.save_lora(everything, out / f"{out.name}_kohya.safetensors", "kohya", meta, torch.float16)  # A1111
    elif cfg.kind == "controlnet":
        save_controlnet(module, out)
    else:
        pipe.unet = module
        pipe.to(dtype=torch.float16)  # shipped in fp16, as the base model
        pipe.save_pretrained(out)
    timings = {"train_minutes": round((time.time() - t0) / 60, 1), "steps": cfg.steps, "batch": cfg.batch}
    (work / "timings.json").write_text(json.dumps(timings))
    log(f"saved to {out}; {timings}")
    return out


KIND_DEFAULTS = {"lora": {}, "controlnet": {"steps": 300, "batch": 32, "lr": 1e-3, "warmup": 30, "n_images": 8000},
                 "inpaint": {"steps": 1500, "batch": 32, "lr": 1e-3, "warmup": 30, "n_images": 8000}}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="minisd train lora|controlnet|inpaint", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["lora", "controlnet", "inpaint"])
    for f, v in asdict(AdapterConfig()).items():
        if f != "kind":
            others = ", ".join(f"{kind}: {d[f]}" for kind, d in KIND_DEFAULTS.items() if f in d)
            parser.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=None,
                                help=f"default {v}" + (f" ({others})" if others else ""))
    parser.add_argument("--fresh", action="store_true", help="ignore the checkpoint in --work and start over")
    args = parser.parse_args(argv)
    given = {f: getattr(args, f) for f in asdict(AdapterConfig()) if f != "kind" and getattr(args, f) is not None}
    cfg = AdapterConfig(kind=args.kind, **{**KIND_DEFAULTS[args.kind], **given})
    if args.fresh:
        (cfg.paths()[1] / f"{cfg.kind}.pt").unlink(missing_ok=True)
    return train_adapter(cfg)


__all__ = ["AdapterConfig", "main", "train_adapter"]
