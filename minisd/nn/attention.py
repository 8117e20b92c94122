"""Attention: one function, two paths, and a way to look inside.

Legend: B batch, L query tokens (L = H·W for an image), S key/value tokens (S = T = 77 text tokens
for cross-attention), nh heads, hd head dim, C = nh·hd channels.

    Attention(Q, K, V) = softmax(Q Kᵀ / √hd) V                              (Vaswani et al. 2017, eq. 1)

Self-attention takes Q, K and V from the image tokens; cross-attention (Stable Diffusion's way of
reading the prompt) takes Q from the image and K, V from the text encoder's output `context`, so
softmax row i says which prompt tokens pixel i looks at (notebook 06).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, naive: bool = False,
              upcast: bool = False) -> Tensor:
    """softmax(q kᵀ / √hd) v for q (B, nh, L, hd), k and v (B, nh, S, hd) -> (B, nh, L, hd).

    `naive=True` writes the formula out (and is what notebook 06 derives); the default calls
    PyTorch's fused `scaled_dot_product_attention` (flash / memory-efficient kernels), which gives
    the same numbers without materialising the (L, S) matrix. `upcast` computes in fp32 (SD 2.1), also
    under autocast, which would otherwise cast the inputs straight back down.

    bf16 on a CPU is always upcast: PyTorch's CPU flash kernel is 1.9-3.2× slower in bf16 than in fp32 at
    the tiny U-Net's shapes (head dim 16-32), and had made attention the largest part of a bf16-autocast training step;
    with it in fp32 the step takes 0.95 s against diffusers' 1.22 s (2 cores; benchmarks/train_cpu.py).
    """
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        upcast = True
    if naive:
        return attention_probs(q, k, causal=causal, upcast=upcast).to(v.dtype) @ v
    if upcast and q.dtype != torch.float32:
        with torch.autocast(q.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def attention_probs(q: Tensor, k: Tensor, *, causal: bool = False, upcast: bool = False) -> Tensor:
    """The attention matrix softmax(q kᵀ / √hd): (B, nh, L, S), rows sum to 1."""
    with torch.autocast(q.device.type, enabled=False) if upcast else contextlib.nullcontext():
        if upcast:
            q, k = q.float(), k.float()
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, nh, L, S)
        if causal:  # token i may only look at tokens j <= i (the CLIP text encoder)
            L, S = scores.shape[-2:]
            future = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(dim=-1)


class Attention(nn.Module):
    """Multi-head attention with the diffusers names: to_q, to_k, to_v, to_out.0.

    `context=None` is self-attention. While `capture` holds a list (see `capture_attention`), the
    forward pass takes the naive path and appends its attention matrix (B, nh, L, S) to it.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 qkv_bias: bool = False, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.is_cross = context_dim is not None
        context_dim = context_dim or query_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])  # .1: dropout, no weights
        self.capture: list[Tensor] | None = None
        self.slice_size: int | None = None  # attention over this many queries at a time (enable_attention_slicing)
        self.fused = False                  # q, k, v (or k, v) in one matmul (fuse_projections)

    def fuse_projections(self) -> None:
        """One matmul instead of three: W_qkv = [W_q; W_k; W_v] (self-attention), or [W_k; W_v] for
        cross-attention, whose q reads the image and k, v the text. A snapshot of the weights, kept as
        non-persistent buffers, so state_dict() and saved files do not change; `unfuse_projections`."""
        names = ("to_k", "to_v") if self.is_cross else ("to_q", "to_k", "to_v")
        projections = [getattr(self, n) for n in names]
        # the fused path reads the weights and skips the projections' own forward: plain nn.Linear only
        # (a LoRA swaps in a LoRALinear, int8 quantization an Int8Linear)
        for n, p in zip(names, projections):
            if type(p) is not nn.Linear:
                raise RuntimeError(f"{n} is a {type(p).__name__}, not a plain nn.Linear (LoRAs are attached, or it "
                                   f"is quantized): fuse the QKV projections first, or unload the LoRAs")
        with torch.no_grad():
            weight = torch.cat([p.weight for p in projections])
            bias = torch.cat([p.bias for p in projections]) if self.to_q.bias is not None else None
        self.register_buffer("fused_weight", weight, persistent=False)
        self.register_buffer("fused_bias", bias, persistent=False)
        self.fused = True

    def unfuse_projections(self) -> None:
        if self.fused:
            del self.fused_weight, self.fused_bias
            self.fused = False

    def project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q from the image tokens x; k, v from `context` (cross-attention) or from x itself."""
        if self.fused and (context is None) != self.is_cross:
            if self.is_cross:
                k, v = F.linear(context, self.fused_weight, self.fused_bias).chunk(2, dim=-1)
                return self.to_q(x), k, v
            q, k, v = F.linear(x, self.fused_weight, self.fused_bias).chunk(3, dim=-1)
            return q, k, v
        context = x if context is None else context
        return self.to_q(x), self.to_k(context), self.to_v(context)  # (B, L or S, C)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        B, L, _ = x.shape
        q, k, v = self.project(x, context)
        nh = self.heads
        q, k, v = (y.reshape(B, -1, nh, y.shape[-1] // nh).transpose(1, 2) for y in (q, k, v))  # (B, nh, ·, hd)
        if self.capture is not None:
            probs = attention_probs(q, k, upcast=self.upcast)
            self.capture.append(probs.detach().float().cpu())
            out = probs.to(v.dtype) @ v
        elif self.slice_size and self.slice_size < L:  # peak memory of one (slice, S) block, not (L, S)
            out = torch.cat([attention(q[:, :, i:i + self.slice_size], k, v, upcast=self.upcast)
                             for i in range(0, L, self.slice_size)], dim=2)
        else:
            out = attention(q, k, v, upcast=self.upcast)
        out = out.transpose(1, 2).reshape(B, L, -1)  # (B, L, C)
        return self.to_out[0](out)


@contextlib.contextmanager
def capture_attention(model: nn.Module, kind: str = "cross") -> Iterator[dict[str, list[Tensor]]]:
    """Record attention matrices while the block runs: {module name: [probs per call]}.

        with capture_attention(pipe.unet) as maps:
            pipe("a red circle on the left", num_inference_steps=10)
        maps["down_blocks.1.attentions.0.transformer_blocks.0.attn2"][step]  # (B, nh, H·W, 77)

    `kind`: "cross" (attn2, image→text: the per-token maps), "self" (attn1) or "all".
    """
    if kind not in ("cross", "self", "all"):
        raise ValueError(f"kind must be 'cross', 'self' or 'all', got {kind!r}")
    suffix = {"cross": ("attn2",), "self": ("attn1",), "all": ("attn1", "attn2")}[kind]
    maps: dict[str, list[Tensor]] = {}
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and n.endswith(suffix)
               or kind != "self" and getattr(m, "records_cross", False)]  # MMDiT: the image→text part of joint attention
    for name, module in modules:
        module.capture = maps.setdefault(name, [])
    try:
        yield maps
    finally:
        for _, module in modules:
            module.capture = None
