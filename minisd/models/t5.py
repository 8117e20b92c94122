"""The T5 v1.1 encoder: token ids -> one vector per token, SD 3's third (and widest) text conditioning.

Legend: B batch, T tokens (256 in SD 3), E width (d_model, 4096 for T5-XXL), nh heads, hd = d_kv,
F feed-forward width (d_ff, 10240 for XXL).

    ids (B,T) ─ shared embedding ─ N × [x + attn(RMSNorm(x), bias); x + gated-GELU MLP(RMSNorm(x))] ─ RMSNorm ─ (B,T,E)

Raffel et al. 2020 (T5), with the v1.1 changes: a gated-GELU feed-forward (Shazeer 2020),
wo · (GELU_tanh(wi_0 x) ⊙ wi_1 x), and no bias anywhere. Three details differ from CLIP's encoder:

- the norm is RMSNorm, x / √(mean(x²) + ε) · w: no mean subtracted, no bias;
- attention is softmax(q kᵀ + b) v with no 1/√hd (it is folded into the initialisation), and the
  position information is only b: a learned scalar per head for each bucket of the relative
  distance j − i, computed in the first layer and shared by all (no absolute position embedding);
- nothing is causal: every token sees every other (padding can be masked with `attention_mask`).

Attribute names follow transformers' `T5EncoderModel` (`encoder.block.0.layer.0.SelfAttention.q`), so its
checkpoints load with no key map. `shared` and `encoder.embed_tokens` are one module (tied), as there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_float, check_int


@dataclass(frozen=True)
class T5Config:
    """Field names are transformers' `T5Config`'s; the defaults are T5 v1.1 XXL (google/t5-v1_1-xxl),
    the encoder SD 3 ships as text_encoder_3."""

    vocab_size: int = 32128                # SentencePiece pieces (32000) + 100 sentinels, padded to ×128
    d_model: int = 4096                    # E
    d_ff: int = 10240                      # F, the gated MLP's width
    d_kv: int = 64                         # hd
    num_heads: int = 64                    # nh
    num_layers: int = 24                   # encoder blocks
    relative_attention_num_buckets: int = 32   # distance buckets (half for j < i, half for j > i)
    relative_attention_max_distance: int = 128  # distances beyond this share the last bucket
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        name = "T5Config"
        check_int(name, "vocab_size", self.vocab_size, 1, 1_000_000)
        check_int(name, "d_model", self.d_model, 1, 65536)
        check_int(name, "d_ff", self.d_ff, 1, 262144)
        check_int(name, "d_kv", self.d_kv, 1, 1024)
        check_int(name, "num_heads", self.num_heads, 1, 1024)
        check_int(name, "num_layers", self.num_layers, 1, 256)
        check_int(name, "relative_attention_num_buckets", self.relative_attention_num_buckets, 4, 1024)
        check_int(name, "relative_attention_max_distance", self.relative_attention_max_distance, 1, 1_000_000)
        check_float(name, "layer_norm_epsilon", self.layer_norm_epsilon, 0.0, 1.0, lo_open=True)

    @classmethod
    def from_transformers(cls, cfg: dict) -> T5Config:
        """Read a transformers `text_encoder_3/config.json` (T5EncoderModel, v1.1 gated-GELU)."""
        if cfg.get("model_type", "t5") != "t5":
            raise ValueError(f"text encoder model_type {cfg['model_type']!r}; expected 't5'")
        act = cfg.get("feed_forward_proj", "relu")
        if act not in ("gated-gelu",):
            raise ValueError(f"T5 feed_forward_proj {act!r}; expected 'gated-gelu' (T5 v1.1, as SD 3 uses)")
        return cls(vocab_size=cfg.get("vocab_size", 32128), d_model=cfg.get("d_model", 512),
                   d_ff=cfg.get("d_ff", 2048), d_kv=cfg.get("d_kv", 64), num_heads=cfg.get("num_heads", 8),
                   num_layers=cfg.get("num_layers", 6),
                   relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
                   relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
                   layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6))

    def to_transformers(self) -> dict:
        return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": self.vocab_size,
                "d_model": self.d_model, "d_ff": self.d_ff, "d_kv": self.d_kv, "num_heads": self.num_heads,
                "num_layers": self.num_layers, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
                "is_gated_act": True, "relative_attention_num_buckets": self.relative_attention_num_buckets,
                "relative_attention_max_distance": self.relative_attention_max_distance,
                "layer_norm_epsilon": self.layer_norm_epsilon, "tie_word_embeddings": False,
                "dropout_rate": 0.1, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


def relative_position_bucket(relative: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bucket of each relative distance j − i (bidirectional): half the buckets for j > i, half for j ≤ i;
    within a half, distances 0..n/2−1 get a bucket each and larger ones share logarithmically wider
    buckets up to `max_distance` (Raffel et al. 2020, §2.1; mesh-tensorflow's `_relative_position_bucket`)."""
    n = num_buckets // 2
    bucket = (relative > 0).long() * n
    distance = relative.abs()
    exact = n // 2
    log_ratio = torch.log(distance.float() / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (n - exact)).long()).clamp(max=n - 1)  # .long() truncates, as in T5
    return bucket + torch.where(distance < exact, distance, large)


class T5LayerNorm(nn.Module):
    """RMSNorm: x / √(mean(x²) + ε) · w, statistics in fp32 (T5's "layer_norm")."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    """softmax(q kᵀ + bias) v over all tokens; the first layer also owns the relative position bias table."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.cfg = cfg.num_heads, cfg
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def compute_bias(self, T: int) -> Tensor:
        """The position bias b[h, i, j] = table[bucket(j − i), h]: (1, nh, T, T)."""
        device = self.relative_attention_bias.weight.device
        pos = torch.arange(T, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)  # (T, T)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, nh, T, T)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = (y.view(B, T, self.heads, -1).transpose(1, 2) for y in (self.q(x), self.k(x), self.v(x)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, nh, T, hd)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """wo · (GELU_tanh(wi_0 x) ⊙ wi_1 x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))  # wo may be kept in fp32 while the rest runs in fp16


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)  # the name predates the gated GELU
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def clamp_fp16(x: Tensor) -> Tensor:
    """In fp16, pull ±inf back into range as transformers does (T5-XXL's activations overflow fp16)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return x.clamp(-limit, limit)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = clamp_fp16(self.layer[0](x, bias))
        return clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([T5Block(cfg, has_relative_attention_bias=i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        x = self.embed_tokens(ids)  # (B, T, E)
        bias = self.block[0].layer[0].SelfAttention.compute_bias(ids.shape[1])  # (1, nh, T, T), shared by all
        if attention_mask is not None:  # padding keys get −∞ (the most negative float), for every query
            masked = (attention_mask[:, None, None, :] == 0)  # (B, 1, 1, T)
            bias = bias.masked_fill(masked, torch.finfo(bias.dtype).min)  # (B, nh, T, T)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Module):
    """ids (B,T) -> last hidden state (B,T,E) (transformers' T5EncoderModel's `last_hidden_state`)."""

    def __init__(self, cfg: T5Config = T5Config()):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, self.shared)  # tied: encoder.embed_tokens is `shared`

    def to(self, *args, **kwargs) -> T5Encoder:
        """nn.Module.to, but in float16 every feed-forward's `wo` stays in float32, as transformers keeps it
        (T5's `_keep_in_fp32_modules`): T5 v1.1's activations there overflow fp16. The residual stream then
        turns float32 after the first feed-forward, exactly as in transformers."""
        super().to(*args, **kwargs)
        if self.shared.weight.dtype == torch.float16:
            for module in self.modules():
                if isinstance(module, T5DenseGatedActDense):
                    module.wo.float()
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """`attention_mask` (B,T), 1 for tokens and 0 for padding; SD 3 passes none (padding is attended)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids of shape {tuple(input_ids.shape)}; expected (B, T)")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids in {input_ids.min().item()}..{input_ids.max().item()}; expected "
                             f"0..{self.config.vocab_size - 1}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}; expected "
                             f"{tuple(input_ids.shape)}, like input_ids")
        return self.encoder(input_ids, attention_mask)
