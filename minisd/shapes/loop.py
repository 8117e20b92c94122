"""What every training loop of the shapes world shares: the log, the learning-rate schedule, checkpoints
and files written atomically, the diffusion loss, EMA, bfloat16 autocast, and the checks that refuse a
careless config before any work. Under several processes (dist.py) the log, the progress bar and the
checkpoints are rank 0's alone, and the optimiser step averages the gradients over the processes.

The loops themselves (train.py for the base model; train_lora.py, train_controlnet.py, train_inpaint.py
for what is trained on it) import from here; nothing here imports them.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .dist import SINGLE, Dist
from ..diffusion import objectives
from ..formats.files import atomic_write
from ..models.unet import UNet


class Log:
    """Lines with the time, printed and appended to <work>/log.txt; silent where not `main` (rank 0 logs)."""

    def __init__(self, work: Path, main: bool = True):
        work.mkdir(parents=True, exist_ok=True)
        self.path, self.main = work / "log.txt", main

    def __call__(self, msg: str) -> None:
        if not self.main:
            return
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        tqdm.write(line)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def progress(start: int, total: int, name: str, main: bool = True) -> tqdm:
    """A progress bar over the steps start .. total − 1; a silent one where not `main` (rank 0 shows it).
    (Only a hidden bar passes `disable`: tqdm's TQDM_DISABLE=1 applies to bars that leave it unset.)"""
    return tqdm(range(start, total), desc=name, initial=start, total=total, **({} if main else {"disable": True}))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ─── files: written whole or not at all ───────────────────────────────────────────────────────────

def save_checkpoint(path: Path, losses: list[float] | None = None, **state) -> None:
    """state (model=..., opt=..., step=...) and, if given, every loss so far, so a resumed curve is whole."""
    if losses is not None:
        state["losses"] = torch.tensor(losses, dtype=torch.float32)  # the losses are fp32 values: exact
    atomic_write(path, lambda tmp: torch.save(state, tmp))  # an interrupted save never leaves half a checkpoint


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def resume(path: Path, log: Log, **objects) -> tuple[int, list[float]]:
    """Restore `objects` (model=..., opt=..., ema=...) from a stage's checkpoint: the step to continue from,
    and the losses of the steps before it (0 and [] without a checkpoint)."""
    ck = load_checkpoint(path)
    if ck is None:
        return 0, []
    for name, obj in objects.items():
        obj.load_state_dict(ck[name])
    log(f"{path.stem}: resumed at step {ck['step']}")
    return ck["step"], ck["losses"].tolist() if "losses" in ck else []


class Steps:
    """The bookkeeping around a fine-tuning loop's steps, the same for every kind: a progress bar with the
    running loss, a log line every 100 steps (and at the last), a checkpoint every `minutes` and at the end
    holding the state and every loss so far (so a resumed curve is whole). Not `main` (a process other than
    rank 0): no bar, no log, no checkpoint.

        steps = Steps("lora", step0, cfg.steps, log, work / "lora.pt", cfg.checkpoint_minutes, losses, dist.is_main)
        for step in steps:
            ...
            steps.record(step, dist.all_mean(loss).item(), opt.param_groups[0]["lr"], state)  # state() -> dict to save
        steps.finish(state)
    """

    def __init__(self, name: str, start: int, total: int, log: Log, path: Path, minutes: float, losses: list[float],
                 main: bool = True):
        self.name, self.start, self.total, self.log, self.path = name, start, total, log, path
        self.minutes, self.losses, self.last_save, self.main = minutes, losses, time.time(), main
        self.bar = progress(start, total, name, main)
        self.seconds_per_step: float | None = None  # measured over this run's steps, when they are done

    def __iter__(self):
        t0 = time.time()
        yield from self.bar
        if self.total > self.start:
            self.seconds_per_step = (time.time() - t0) / (self.total - self.start)

    def record(self, step: int, loss: float, lr: float, state) -> None:
        self.losses.append(loss)
        if step % 25 == 0:
            self.bar.set_postfix(loss=f"{sum(self.losses[-25:]) / len(self.losses[-25:]):.4f}")
        if step % 100 == 0 or step == self.total - 1:
            recent = self.losses[-100:]
            self.log(f"{self.name} step {step}: loss {sum(recent) / len(recent):.4f}, lr {lr:.2e}")
        if self.main and time.time() - self.last_save > self.minutes * 60:
            save_checkpoint(self.path, self.losses, **state(), step=step + 1)
            self.last_save = time.time()

    def finish(self, state) -> None:
        if self.main:
            save_checkpoint(self.path, self.losses, **state(), step=self.total)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def refuse_overwrite(out: Path, force: bool) -> None:
    """A trained model is never replaced by accident: an existing, non-empty `out` needs --force."""
    if not force and out.exists() and (out.is_file() or any(out.iterdir())):
        raise ValueError(f"--out {out} already holds files; pass --force to overwrite them, or choose another --out")


@contextmanager
def seeded(seed: int, device: torch.device | str = "cpu"):
    """The random generators of the CPU (where networks are initialised) and of `device`, if a GPU, seeded
    for a block and put back as they were after it: a loop draws the same numbers for the same seed, and
    the caller's random state is left alone."""
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


def field_help(cls) -> dict[str, str]:
    """Each field of a config dataclass -> its comment in the class's source and its default: the `--help`
    of a training command says what the code says. A comment that goes on over the next lines (a comment
    line indented past the fields, or a field's comment starting "#   ") describes the fields it spans
    together; a comment line at the fields' indentation heads a section and belongs to no field."""
    names, groups, group = {f.name for f in fields(cls)}, [], None
    for line in inspect.getsource(cls).splitlines()[1:]:
        field = re.match(r"(\s+)(\w+): [^=]+=\s*[^#]*?(?:#(\s*)(.*))?$", line)
        alone = re.match(r"(\s+)#\s*(.*)$", line)
        if field and field[2] in names:
            if group is not None and field[3] is not None and len(field[3]) >= 3:  # "#   ..." continues the last
                group[0].append(field[2])
                group[1].append(field[4])
            else:
                group = ([field[2]], [field[4] or ""])
                groups.append(group)
        elif alone and group is not None and len(alone[1]) > 4:  # indented past the fields: the comment above goes on
            group[1].append(alone[2])
        else:
            group = None
    defaults = {f.name: f.default for f in fields(cls)}
    helps = {name: " ".join(t for t in texts if t).strip() for members, texts in groups for name in members}
    return {name: ((f"{text} " if text else "") + f"(default: {defaults[name]!r})").replace("%", "%%")  # argparse's
            for name, text in helps.items()}


def config_flags(parser, cls) -> None:
    """A --flag for each field of the config dataclass `cls`, typed and defaulted as the field, with its
    comment as help (`field_help`)."""
    helps = field_help(cls)
    for f in fields(cls):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default, help=helps.get(f.name))


def config_from(args, cls):
    """The config `cls` from parsed `config_flags` (its checks refuse careless values)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


# ─── refusing careless input ──────────────────────────────────────────────────────────────────────

def check_config(cfg, *, at_least_1=(), at_least_0=(), above_0=(), not_negative=(), shares=(),
                 choices: dict | None = None) -> None:
    """ValueError, one line naming the flag, the value and what was expected, for the first bad field:
    whole counts (at_least_1, at_least_0), rates and scales (above_0, not_negative), shares in [0, 1],
    a fixed set of words (choices), any float that is NaN or infinite, and the device."""
    def bad(name: str, expected: str):
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{flag} must be {expected}, got {getattr(cfg, name)!r}")

    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            bad(f.name, "a finite number")
    for name in at_least_1:
        if getattr(cfg, name) < 1:
            bad(name, "at least 1")
    for name in at_least_0:
        if getattr(cfg, name) < 0:
            bad(name, "0 or more")
    for name in above_0:
        if not getattr(cfg, name) > 0:
            bad(name, "a number above 0")
    for name in not_negative:
        if getattr(cfg, name) < 0:
            bad(name, "a number >= 0")
    for name in shares:
        if not 0 <= getattr(cfg, name) <= 1:
            bad(name, "a share between 0 and 1")
    for name, allowed in (choices or {}).items():
        if getattr(cfg, name) not in allowed:
            bad(name, "one of " + ", ".join(repr(a) for a in allowed))
    try:
        torch.device(cfg.device)
    except RuntimeError:
        bad("device", "a torch device such as 'cpu' or 'cuda'")


# ─── the objective and its helpers ────────────────────────────────────────────────────────────────

def diffusion_loss(unet: UNet, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, context: torch.Tensor,
                   alpha_bar: torch.Tensor, min_snr_gamma: float | None = 5.0, control=None,
                   weight: torch.Tensor | None = None, prediction_type: str = "epsilon") -> torch.Tensor:
    """The training objective: noise z₀ in one jump, predict the target, weighted squared error.

        z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε                      (the forward process, schedules.py eq. 2)
        L   = mean_b  w(t_b) · ‖y_b − f_θ(z_t, t_b, c_b)‖² / D,   y = ε, v or the flow's velocity
        w(t) = Min-SNR-γ (Hang et al. 2023; None: w = 1, DDPM's)  (`diffusion.objectives`)

    `t` comes from `objectives.draw_timesteps` (N·σ for flow). `weight` (B, 1, h, w), optional: a weight
    per latent cell inside the norm (the star LoRA's notches).
    """
    z_t, target = objectives.noised_and_target(prediction_type, z0, eps, t, alpha_bar, len(alpha_bar))
    err = (unet(z_t, t, context, control=control) - target).pow(2)
    per_sample = (err if weight is None else weight * err).mean(dim=(1, 2, 3))
    w = objectives.loss_weights(prediction_type, t, alpha_bar, min_snr_gamma)
    return per_sample.mean() if w is None else (w * per_sample).mean()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float = 0.999) -> float:
    """θ_ema ← d·θ_ema + (1−d)·θ, with d = min(decay, (1+step)/(10+step)): early, noisy weights are
    forgotten fast; later the average spans ~1/(1−decay) steps. Returns d."""
    d = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - d)
    return d


def use_bf16(setting: str, device: torch.device) -> bool:
    """Whether to train under bfloat16 autocast: "auto" means where the hardware does bf16 natively — CUDA, or
    a CPU with avx512_bf16 / AMX (1.04 instead of 1.41 s per U-Net step of the recipe on the 2-core reference
    machine, attention kept in fp32 — attention.py; gradients close to fp32's, tests/test_train.py);
    elsewhere bf16 is emulated and slower than fp32."""
    if setting not in ("yes", "no", "auto"):
        raise ValueError(f"bf16 must be 'yes', 'no' or 'auto', not {setting!r}")
    if setting != "auto":
        return setting == "yes"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return device.type == "cpu" and ("avx512_bf16" in flags or "amx_bf16" in flags)


def optimiser_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params, clip: float | None = 1.0,
                   dist: Dist = SINGLE) -> None:
    """Backward, average the gradients over the processes (dist.py; one process: nothing), clip the
    gradient norm (None: no clipping), step."""
    params = list(params)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    dist.average_gradients(params)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edge_map(x: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """1 on and next to the outlines of a picture in [-1, 1] (Sobel magnitude of its grey levels,
    widened by one pixel), else 0: (B, 1, H, W). The VAE's and the star LoRA's losses weight these."""
    kernels = torch.stack([_SOBEL, _SOBEL.T])[:, None].to(x)  # d/dx, d/dy
    grad = F.conv2d(F.pad(x.mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate"), kernels)  # no border edges
    return F.max_pool2d((grad.pow(2).sum(1, keepdim=True).sqrt() > threshold).to(x), 3, stride=1, padding=1)
