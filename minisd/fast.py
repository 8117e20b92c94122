"""Making it fast, and making it fit: the switches notebook 13 measures, one at a time.

Speed (docs/benchmarks.md has the GPU numbers, notebook 13 the CPU ones):

    pipe.to("cuda", torch.float16)          half precision: tensor cores, half the bytes moved
    pipe.fuse_qkv_projections()             q, k, v in one matmul: fewer, larger kernels
    pipe.compile()                          torch.compile the U-Net and the VAE decoder (Inductor fuses
                                            the element-wise work around the convolutions and matmuls)
    pipe.compile(mode="reduce-overhead")    ... and CUDA graphs: each U-Net call replays as one launch

Memory (each costs some speed; for GPUs that are too small, and for big pictures):

    pipe.enable_attention_slicing()         attention over slices of the queries
    pipe.enable_vae_slicing() / _tiling()   decode one image, or one tile, at a time
    pipe.enable_model_cpu_offload()         only the component at work sits on the GPU
    quantize_int8(pipe.unet)                int8 Linear weights, one scale per output channel
    quantize_fp8(pipe.unet)                 float8 (e4m3) Linear weights and activations, FP8 matmuls

Scaled-dot-product attention (flash / memory-efficient kernels) and channels-last VAE weights are
on by default (attention.py, pipeline.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters.lora import LoRAConv2d, LoRALinear
from .nn.attention import Attention


# ─── int8 weights ──────────────────────────────────────────────────────────────────────────────────

class Int8Linear(nn.Module):
    """A Linear layer with int8 weights: W ≈ s ⊙ W_q, W_q = round(W / s) ∈ [−127, 127], one scale
    s = max|W_row| / 127 per output channel, so each weight is off by at most s/2.

    mode "weight-only": y = x (s ⊙ W_q)ᵀ + b, dequantised on the fly: a quarter of fp32's (half of
    fp16's) weight memory, no faster. "dynamic": x is quantised too, per token (s_x = max|x_row| / 127),
    and y = s_x s_w (x_q W_qᵀ) + b runs as an int8 matmul (`torch._int_mm`)."""

    def __init__(self, linear: nn.Linear, mode: str = "weight-only"):
        super().__init__()
        if mode not in ("weight-only", "dynamic"):
            raise ValueError(f"mode must be 'weight-only' or 'dynamic', got {mode!r}")
        self.in_features, self.out_features, self.mode = linear.in_features, linear.out_features, mode
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127  # (out, 1)
        self.register_buffer("weight_int8", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "dynamic" and x.numel() // x.shape[-1] > 16:  # _int_mm needs more than 16 rows
            rows = x.reshape(-1, x.shape[-1])
            sx = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 127  # (N, 1)
            xq = torch.round(rows.float() / sx).clamp(-127, 127).to(torch.int8)
            y = torch._int_mm(xq, self.weight_int8.t()).float() * sx * self.scale.float().t()
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight_int8.to(x.dtype) * self.scale.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def quantize_int8(model: nn.Module, mode: str = "weight-only", min_features: int = 64) -> dict[str, int]:
    """Replace every nn.Linear of `model` (both sides >= min_features) by an `Int8Linear`, in place.
    Returns {"layers": n, "bytes_before": ..., "bytes_after": ...} for the replaced weights.
    The convolutions stay as they are (in SD's U-Net they hold about half of the weights)."""
    return _replace_linears(model, lambda linear: Int8Linear(linear, mode), min_features)


def _replace_linears(model: nn.Module, make, min_features: int) -> dict[str, int]:
    carriers = [name for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))]
    if carriers:  # a quantized layer has no LoRA path, and the LoRAs' own A and B are no model weights to quantize
        raise RuntimeError(f"{carriers[0]} carries LoRAs ({len(carriers)} layers do): unload them "
                           f"(pipe.unload_lora()) before quantizing")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and min(m.in_features, m.out_features) >= min_features]
    before = after = 0
    for name, linear in targets:
        q = make(linear)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        before += linear.weight.numel() * linear.weight.element_size()
        after += sum(b.numel() * b.element_size() for b in q.buffers())
    return {"layers": len(targets), "bytes_before": before, "bytes_after": after}


# ─── float8 weights and matmuls ────────────────────────────────────────────────────────────────────

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max   # 448: e4m3 keeps 3 mantissa bits, so each value is off by up to 1/16 of itself


class Float8Linear(nn.Module):
    """A Linear layer in float8 (e4m3), as FP8 inference on an H100 runs it: W ≈ s_w W_8 with one scale
    s_w = max|W| / 448 for the tensor, and per call x ≈ s_x x_8 likewise; y = s_x s_w (x_8 W_8ᵀ) + b is one
    scaled FP8 matmul (`torch._scaled_mm`: FP8 tensor cores on an H100, twice fp16's rate; a reference
    kernel on the CPU). Half of fp16's weight memory. Shapes whose sides are not multiples of 16 (the
    FP8 kernels' tile) are computed from the dequantised weight instead."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = w.abs().amax().clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight_fp8", (w / scale).to(FP8))
        self.register_buffer("scale", scale.reshape(()))
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.in_features % 16 or self.out_features % 16 or rows.shape[0] % 16:
            w = (self.weight_fp8.float() * self.scale).to(x.dtype)
            return F.linear(x, w, self.bias)
        sx = rows.abs().amax().float().clamp(min=1e-12) / FP8_MAX
        x8 = (rows.float() / sx).to(FP8)
        y = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=sx, scale_b=self.scale, out_dtype=x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn"


def quantize_fp8(model: nn.Module, min_features: int = 64) -> dict[str, int]:
    """Replace every nn.Linear of `model` (both sides >= min_features) by a `Float8Linear`, in place; as
    `quantize_int8`, the same report."""
    return _replace_linears(model, Float8Linear, min_features)


# ─── attention ─────────────────────────────────────────────────────────────────────────────────────

def _attentions(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def fuse_qkv_projections(model: nn.Module, fused: bool = True) -> int:
    """Fuse (or unfuse) the q/k/v projections of every attention layer of `model`; returns how many."""
    layers = _attentions(model)
    for m in layers:
        m.fuse_projections() if fused else m.unfuse_projections()
    return len(layers)


def set_attention_slice(model: nn.Module, slice_size: int | None) -> int:
    """Attention over `slice_size` queries at a time in every attention layer (None: all at once)."""
    if slice_size is not None and slice_size < 1:
        raise ValueError(f"slice_size must be a positive number of queries or None, got {slice_size}")
    layers = _attentions(model)
    for m in layers:
        m.slice_size = slice_size
    return len(layers)


# ─── CPU offload ───────────────────────────────────────────────────────────────────────────────────

class ModelOffload:
    """Keep every component in CPU memory and move each to `device` just before it runs, sending the
    one that ran before back: the GPU holds one component at a time (the U-Net, with its ControlNets,
    is the largest). Forward pre-hooks do the moving; `remove()` takes them off."""

    def __init__(self, pipe, device: str | torch.device):
        self.device = torch.device(device)
        self.groups = {"text_encoder": [pipe.text_encoder], "unet": [pipe.unet, *pipe.controlnets], "vae": [pipe.vae]}
        self.active: str | None = None
        self.handles = []
        # what runs first in each group: the VAE is used through encode (encoder) and decode (post_quant_conv)
        entries = {"text_encoder": [pipe.text_encoder], "unet": self.groups["unet"],
                   "vae": [pipe.vae.encoder, pipe.vae.post_quant_conv]}
        for name, modules in entries.items():
            for m in modules:
                self.handles.append(m.register_forward_pre_hook(self._hook(name)))
        for group in self.groups.values():
            self._move(group, "cpu")

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.use(name)
        return hook

    def _move(self, modules: list[nn.Module], device) -> None:
        for module in modules:
            module.to(device)  # with its LoRAs, which sit in the module tree

    def use(self, name: str) -> None:
        if name == self.active:
            return
        if self.active is not None:
            self._move(self.groups[self.active], "cpu")
        self._move(self.groups[name], self.device)
        self.active = name

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


__all__ = ["Int8Linear", "ModelOffload", "fuse_qkv_projections", "quantize_int8", "set_attention_slice"]
