"""Teaching the frozen tiny model to move things: an AnimateDiff motion module trained on moving shapes.

    frozen     the image model (data/tiny): VAE, text encoder, U-Net, every weight as it is
    trainable  a fresh MotionAdapter sized for the tiny U-Net (proj_out at zero: it starts as the identity,
               the video model as the image model frame by frame), and the direction words the tokenizer
               lacks, as new token embeddings; optionally a LoRA on the spatial cross-attention
    data       moving-shapes clips (moving.py), 8 frames each, every frame encoded by the VAE once
    loss       the ε diffusion loss over every frame of a clip, one timestep and one caption per clip
    saved      a diffusers MotionAdapter folder (config.json + diffusion_pytorch_model.safetensors), beside
               it the words' vectors (direction_words.safetensors), the LoRA if any (spatial_lora.safetensors),
               and training.json

How the direction reaches the model. AnimateDiff's module has no text input: it attends across frames, pixel by
pixel, and text reaches the video U-Net only through the frozen spatial cross-attention, frame by frame. Of the
direction words, "left" and "right" are whole words of the tiny tokenizer (the image grammar's positions); "moving",
"up" and "down" are not ("up" becomes u + p</w>, characters the text encoder never trained on), and "to" is t + o</w>
(it cannot become a token of its own: an added token is matched inside words, "top", "bottom"). So "moving", "up"
and "down" become new tokens whose vectors are trained with the module, as textual inversion trains a word
(adapters/textual_inversion.py), "up" starting from "top", "down" from "bottom", "moving" from "the".

That alone did not carry the direction (research log §12: 800 steps of AnimateDiff's design drew the right
direction in 25% of held-out clips, chance, and turning the direction round in the caption moved the loss by 0–4%).
Two changes, both defaults here:

- `reads_text="yes"`: each temporal block's second attention reads the caption (models/motion.py), its queries
  carrying the frame's position and the pixel's place in the picture (`models.motion.image_positions`): a
  temporal block alone does not know where its pixel is, and "frame 6 of a shape moving to the left" is a place.
  diffusers' MotionAdapter has no such input; `reads_text="no"` trains AnimateDiff's design, which it loads.
- `high_t_share`: half the clips draw their timestep from the noisier half, where sampling decides where each
  frame's object is; at low noise the frames themselves show it and the caption adds nothing.

With both, the shipped data/tiny_motion (3,600 steps × 4 clips) draws the asked direction in 31 of 32 evaluation
clips and keeps the asked colour and shape in ≥ 7 of 8 frames in 30 of 32 (docs/results/motion.json). The two
changes were made together; the finished module draws directions as well with the places zeroed at sampling time
(notebook 19's solutions), so which of them it needed to learn was not separated.

config → data → model → loop → save, in `train_motion`; `load_motion` and `sample_clips` put a saved module to
work (DDIM over the frames, classifier-free guidance).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapters import lora as lora_lib
from ..generate import generate_video
from ..formats.motion import LORA_FILE, WORDS_FILE, load_motion_adapter, save_motion_adapter
from ..formats.weights import read_state_dict, write_safetensors
from ..models.motion import MotionAdapter, MotionAdapterConfig, VideoUNet
from ..pipeline import StableDiffusion
from .adapter_config import encode_all
from .loop import (Log, Steps, check_config, config_flags, config_from, diffusion_loss, lr_at, optimiser_step,
                   refuse_overwrite, resume, seeded, use_bf16, write_json)
from .moving import FRAMES, Clip, clip_tensor, recaption, training_clip
from .train_ti import start_vectors

# the words of the motion phrases the tiny tokenizer lacks, and the word each starts from
INIT_WORDS = {"moving": "the", "up": "top", "down": "bottom"}


@dataclass(frozen=True)
class MotionConfig:
    model: str = "tiny"               # the frozen image model
    out: str = "runs/motion/model"    # the motion module's folder (never data/ by default)
    work: str = "runs/motion"         # checkpoint, log
    device: str = "cpu"
    seed: int = 0
    n_clips: int = 2000               # training clips, rendered and encoded once (a fresh posterior draw each use)
    # data/tiny_motion: 3,600 steps × 4 clips (1.0–1.2 s a step on one thread; it ran as 2,400 steps, then resumed
    # with --steps 3600: 46.4 + 24.4 minutes)
    steps: int = 3600
    batch: int = 4                    # clips a step, each 8 frames through the U-Net
    lr: float = 1e-3                  # the motion module's (and the LoRA's) peak rate; AdamW, cosine to 10%
    warmup: int = 50
    words_lr: float = 5e-3            # the new words' vectors' rate (textual inversion's)
    min_snr_gamma: float = 5.0
    high_t_share: float = 0.5         # clips whose timestep is drawn from the noisier half (t ≥ 500), where a clip's
                                      # layout, and so its motion, is decided; the rest from all timesteps
    caption_dropout: float = 0.1      # captions left empty, for classifier-free guidance
    # the motion module: one per resnet of the U-Net, as AnimateDiff's (its channels and layers are the U-Net's)
    heads: int = 4                    # temporal attention heads at every level (64 and 128 channels: 16 and 32 a head)
    transformer_depth: int = 1        # temporal blocks per motion module
    max_frames: int = 32              # frames that have a position (max_seq_length)
    # how the direction reaches the frozen cross-attention (the module's docstring)
    words: str = "moving,up,down"     # new tokens trained with the module, of: moving, up, down; "" = none
    lora_rank: int = 0                # a LoRA of this rank on lora_targets, trained with the module; 0 = none
    lora_targets: str = "attn2.to_k,attn2.to_v"  # the spatial cross-attention's keys and values
    reads_text: str = "yes"           # yes: each temporal block's second attention reads the caption (minisd's
                                      # extension; diffusers cannot load it); no: AnimateDiff's two self-attentions
    bf16: str = "auto"                # bfloat16 autocast, as for the base model (loop.use_bf16)
    checkpoint_minutes: float = 5.0

    def __post_init__(self):  # careless input is refused before any work
        check_config(self, at_least_1=("n_clips", "steps", "batch", "heads", "transformer_depth"),
                     at_least_0=("seed", "warmup", "lora_rank"),
                     above_0=("lr", "words_lr", "min_snr_gamma", "checkpoint_minutes"), shares=("caption_dropout", "high_t_share"),
                     choices={"bf16": ("yes", "no", "auto"), "reads_text": ("yes", "no")})
        unknown = [w for w in self.word_list if w not in INIT_WORDS]
        if unknown or len(set(self.word_list)) != len(self.word_list):
            raise ValueError(f"--words must be distinct words of {', '.join(INIT_WORDS)} (or ''), got {self.words!r}")
        if self.max_frames < FRAMES:
            raise ValueError(f"--max-frames must be at least {FRAMES} (a clip's frames), got {self.max_frames}")
        if self.lora_rank and not self.lora_targets.strip(","):
            raise ValueError(f"--lora-targets must name at least one layer, got {self.lora_targets!r}")

    @property
    def word_list(self) -> list[str]:
        return [w for w in self.words.split(",") if w]

    def adapter_config(self, unet_config) -> MotionAdapterConfig:
        """The motion module for this U-Net: its channels, layers per level and GroupNorm groups (diffusers'
        UNetMotionModel gives its motion modules the U-Net's groups, whatever the adapter's config says), `heads`
        at every level (a ValueError naming them if they do not divide the channels), and the text's width
        (the U-Net's cross_attention_dim) if it reads the caption."""
        n = len(unet_config.block_out_channels)
        text = unet_config.cross_attention_dim if self.reads_text == "yes" else None
        return MotionAdapterConfig(block_out_channels=tuple(unet_config.block_out_channels),
                                   layers_per_block=unet_config.layers_per_block,
                                   transformer_depth=self.transformer_depth, num_heads=(self.heads,) * n,
                                   norm_num_groups=unet_config.norm_num_groups, max_seq_length=self.max_frames,
                                   text_cross_attention_dim=text)


# ─── data ──────────────────────────────────────────────────────────────────────────────────────────

@torch.no_grad()
def clip_data(cfg: MotionConfig, pipe: StableDiffusion, log: Log, t0: float):
    """The training clips, each frame encoded: (clips, means, stds), the latents (N, F, 4, h, w) on the CPU."""
    clips = [training_clip(i, cfg.seed) for i in range(cfg.n_clips)]
    means, stds = [], []
    for i in range(0, len(clips), 32):  # 256 frames at a time
        frames = torch.cat([clip_tensor(c) for c in clips[i:i + 32]])  # (n·F, 3, 64, 64)
        m, s = encode_all(pipe, frames)
        means.append(m.unflatten(0, (-1, FRAMES))), stds.append(s.unflatten(0, (-1, FRAMES)))
    log(f"data: {len(clips)} clips of {FRAMES} frames rendered and encoded in {time.time() - t0:.0f}s")
    return clips, torch.cat(means), torch.cat(stds)


def draw_captions(clips: list[Clip], idx: torch.Tensor, rng: np.random.Generator, dropout: float) -> list[str]:
    """One caption per clip, re-drawn each time (which attributes get named varies), `dropout` of them ""."""
    return ["" if rng.random() < dropout else recaption(clips[i], rng) for i in idx.tolist()]


# ─── the model ─────────────────────────────────────────────────────────────────────────────────────

def load_frozen(model: str, device: str) -> StableDiffusion:
    """The image model, fp32, eval mode, no gradients."""
    pipe = StableDiffusion.from_pretrained(model, device=torch.device(device), dtype=torch.float32)
    pipe.progress = False
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    return pipe


def add_words(pipe: StableDiffusion, words: list[str], vectors: dict[str, torch.Tensor] | None = None) -> list[int]:
    """The words as new tokens of the tokenizer, each with its vector (E,): `vectors`' (a trained module's), else
    its INIT_WORDS word's embedding. Returns their ids."""
    for word in words:
        vector = vectors[word] if vectors is not None else start_vectors(pipe, INIT_WORDS[word], 1)[0]
        pipe.load_textual_inversion(vector.reshape(1, -1), token=word)
    return pipe.tokenizer.hf.convert_tokens_to_ids(words)


def build(cfg: MotionConfig, pipe: StableDiffusion) -> tuple[VideoUNet, list[int], dict]:
    """What is trained, fresh: (the video U-Net around a new MotionAdapter, the new words' ids, the LoRAs
    {path: LoRA}). Seeded by cfg.seed (the adapter's and the LoRAs' random starts)."""
    with seeded(cfg.seed):
        adapter = MotionAdapter(cfg.adapter_config(pipe.unet.config)).to(pipe.device)
        loras = {}
        if cfg.lora_rank:
            roots = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
            loras = lora_lib.inject(roots, "motion", cfg.lora_rank, float(cfg.lora_rank),
                                    cfg.lora_targets.split(","))
    ids = add_words(pipe, cfg.word_list)
    return VideoUNet(pipe.unet, adapter), ids, loras


def frames_net(video: VideoUNet, frames: int):
    """The video U-Net as diffusion_loss calls a U-Net: z_t (B·F, C, h, w), t (B·F,) the clip's timestep on each
    of its frames, context (B, T, E)."""
    return lambda z_t, t, context, control=None: video(z_t, t[::frames], context, num_frames=frames)


def timesteps(n: int, batch: int, high_share: float, g: torch.Generator) -> torch.Tensor:
    """(batch,) timesteps: uniform on [0, n), except a `high_share` of them uniform on the noisier half [n/2, n)."""
    t = torch.randint(0, n, (batch,), generator=g)
    high = torch.rand(batch, generator=g) < high_share
    return torch.where(high, torch.randint(n // 2, n, (batch,), generator=g), t)


def clip_loss(video: VideoUNet, pipe: StableDiffusion, captions: list[str], z0: torch.Tensor, t: torch.Tensor,
              eps: torch.Tensor, alpha_bar: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
    """The ε loss over whole clips: z0, eps (B, F, C, h, w), t (B,), one caption per clip; gradients reach the
    motion module, the new words' vectors (through the frozen text encoder) and the LoRAs."""
    B, F = z0.shape[:2]
    context = pipe.text_encoder(pipe.tokenizer(captions, warn=False).to(z0.device))  # (B, T, E)
    return diffusion_loss(frames_net(video, F), z0.flatten(0, 1), t.repeat_interleave(F), eps.flatten(0, 1),
                          context, alpha_bar, min_snr_gamma)


# ─── the loop ──────────────────────────────────────────────────────────────────────────────────────

def train_motion(cfg: MotionConfig, force: bool = False) -> Path:
    """The motion module's loop; returns the folder it was saved to."""
    out, work = Path(cfg.out), Path(cfg.work)
    refuse_overwrite(out, force)
    log, t0 = Log(work), time.time()
    log(f"config: {json.dumps(asdict(cfg))}")
    pipe = load_frozen(cfg.model, cfg.device)
    device = pipe.device
    video, ids, loras = build(cfg, pipe)
    clips, means, stds = clip_data(cfg, pipe, log, t0)
    emb = pipe.text_encoder.get_input_embeddings()
    frozen_rows, keep = emb.weight.detach().clone(), torch.ones(emb.num_embeddings, dtype=torch.bool)
    keep[ids] = False
    emb.weight.requires_grad_(bool(ids))
    lora_module = torch.nn.ModuleDict({k.replace(".", "/"): v for k, v in loras.items()})
    groups = [{"params": list(video.adapter.parameters()) + list(lora_module.parameters()), "peak": cfg.lr}]
    if ids:
        groups.append({"params": [emb.weight], "peak": cfg.words_lr})
    params = [p for g in groups for p in g["params"]]
    log(f"motion module: {sum(p.numel() for p in video.adapter.parameters()):,} parameters; words "
        f"{cfg.word_list or 'none'} ({len(ids) * emb.embedding_dim} numbers); LoRA "
        f"{lora_lib.parameter_count(loras):,} parameters")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    step0, losses = resume(work / "motion.pt", log, adapter=video.adapter, embedding=emb, lora=lora_module, opt=opt)

    alpha_bar = pipe.scheduler.alphas_cumprod().to(device)
    rng, g = np.random.default_rng(cfg.seed + step0), torch.Generator().manual_seed(cfg.seed + step0)
    bf16 = use_bf16(cfg.bf16, device)
    log(f"motion: {'bfloat16 autocast' if bf16 else 'float32'}, {torch.get_num_threads()} thread(s)")
    state = lambda: dict(adapter=video.adapter.state_dict(), embedding=emb.state_dict(),  # noqa: E731
                         lora=lora_module.state_dict(), opt=opt.state_dict())
    steps = Steps("motion", step0, cfg.steps, log, work / "motion.pt", cfg.checkpoint_minutes, losses)
    video.adapter.train()
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, group["peak"], cfg.warmup)
        idx = torch.randint(0, len(clips), (cfg.batch,), generator=g)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)).to(device) * pipe.vae.scaling_factor
        captions = draw_captions(clips, idx, rng, cfg.caption_dropout)
        t = timesteps(len(alpha_bar), cfg.batch, cfg.high_t_share, g).to(device)
        eps = torch.randn(z0.shape, generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # the weights stay fp32
            loss = clip_loss(video, pipe, captions, z0, t, eps, alpha_bar, cfg.min_snr_gamma)
        optimiser_step(loss, opt, params)
        with torch.no_grad():
            emb.weight[keep] = frozen_rows[keep]  # only the new words' rows move
        steps.record(step, loss.item(), opt.param_groups[0]["lr"], state)
    steps.finish(state)
    save_motion(out, video.adapter, {w: emb.weight[i].detach() for w, i in zip(cfg.word_list, ids)}, loras)
    return finish(cfg, out, work, log, t0, steps.seconds_per_step)


def save_motion(out: Path, adapter: MotionAdapter, words: dict[str, torch.Tensor], loras: dict) -> None:
    """The diffusers MotionAdapter folder, the words' vectors {word: (E,)} and the LoRA (PEFT layout) beside it."""
    save_motion_adapter(adapter, out)
    if words:
        write_safetensors({w: v.float().cpu().contiguous() for w, v in words.items()}, out / WORDS_FILE,
                          {"minisd_words": ",".join(words)})
    if loras:
        lora_lib.save_lora(loras, out / LORA_FILE, "peft", {"minisd_kind": "motion"})


def finish(cfg: MotionConfig, out: Path, work: Path, log: Log, t0: float, seconds_per_step: float | None) -> Path:
    """training.json beside the result: the config, the minutes and the machine."""
    minutes = {"train_minutes": round((time.time() - t0) / 60, 1), "steps": cfg.steps, "batch": cfg.batch,
               "seconds_per_step": None if seconds_per_step is None else round(seconds_per_step, 4)}
    machine = {"device": cfg.device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "platform": platform.platform(),
               "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}
    write_json(out / "training.json", {"command": "minisd train motion", "config": asdict(cfg), "minutes": minutes,
                                       "machine": machine})
    log(f"saved to {out}; {minutes}")
    return out


# ─── a saved module at work ────────────────────────────────────────────────────────────────────────

def load_motion(pipe: StableDiffusion, folder: str | os.PathLike) -> VideoUNet:
    """The video U-Net of a saved motion module around `pipe`'s U-Net: its adapter, its words added to `pipe`'s
    tokenizer and text encoder, its LoRA (if any) attached to `pipe`'s U-Net."""
    folder = Path(folder)
    adapter = load_motion_adapter(folder, device=pipe.device, dtype=pipe.dtype)
    if (folder / WORDS_FILE).is_file():
        vectors = read_state_dict(folder / WORDS_FILE)
        add_words(pipe, list(vectors), vectors)
    if (folder / LORA_FILE).is_file():
        pipe.load_lora(folder / LORA_FILE, name="motion")
    return VideoUNet(pipe.unet, adapter).eval()


@torch.no_grad()
def sample_clips(pipe: StableDiffusion, video: VideoUNet, prompts: list[str], frames: int = FRAMES, steps: int = 25,
                 guidance_scale: float = 7.5, seed: int = 0, batch: int = 8) -> torch.Tensor:
    """Clips (B, F, 3, H, W) in [0, 1]: `pipe.video`'s steps (DDIM, classifier-free guidance) with `video` as the
    video U-Net; clip i starts from the noise of seed `seed + i` (each frame its own), whatever the batch."""
    c = pipe.unet.config
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        noise = torch.stack([torch.randn((c.in_channels, frames, c.sample_size, c.sample_size),
                                         generator=torch.Generator().manual_seed(seed + start + i))
                             for i in range(len(chunk))]).to(pipe.device, pipe.dtype)  # (B, C, F, h, w)
        out.append(generate_video(pipe, video, chunk, num_frames=frames, latents=noise, sampler="ddim",
                                  num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt").cpu())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> Path:
    """`minisd train motion [--flags]`: a motion module for the frozen image model, on moving shapes."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="minisd train motion", description=__doc__.split("\n\n")[0])
    config_flags(parser, MotionConfig)
    parser.add_argument("--fresh", action="store_true", help="ignore the checkpoint in --work and start over")
    parser.add_argument("--force", action="store_true", help="overwrite a module already in --out")
    args = parser.parse_args(argv)
    cfg = config_from(args, MotionConfig)  # refuses careless values
    if args.fresh:
        (Path(cfg.work) / "motion.pt").unlink(missing_ok=True)
    return train_motion(cfg, force=args.force)


__all__ = ["INIT_WORDS", "MotionConfig", "add_words", "build", "clip_loss", "timesteps", "load_motion", "main", "sample_clips",
           "save_motion", "train_motion"]
