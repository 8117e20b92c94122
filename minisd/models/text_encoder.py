"""The CLIP text encoder: token ids -> one vector per token, the U-Net's `context`.

Legend: B batch, T tokens (77), E width (768 for CLIP ViT-L/14), nh heads, hd = E / nh.

    ids (B,T) ─ token_embedding + position_embedding ─ N × [x + attn(LN(x)); x + mlp(LN(x))] ─ LN ─ (B,T,E)

A GPT-style pre-LayerNorm transformer with a causal mask (token i sees tokens ≤ i), quick-GELU
MLPs (Radford et al. 2021). SD 1.x conditions on the whole last hidden state, not the pooled vector.
Attribute names follow transformers' on-disk `CLIPTextModel` layout (`text_model.encoder.layers.0...`).

SDXL (Podell et al. 2023, §2.1) reads two encoders, CLIP ViT-L and OpenCLIP ViT-bigG (GELU MLPs, 1280
wide, 32 layers), each at its penultimate layer without the final LayerNorm (`hidden_and_pooled`), and
from bigG also the pooled vector: final LayerNorm at the EOS token, then `text_projection`, a bias-free
Linear P×E (transformers' `CLIPTextModelWithProjection`; `with_projection=True`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.attention import attention
from ..checks import check_bool, check_float, check_int


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408                # CLIP BPE vocabulary
    hidden_size: int = 768                 # E
    intermediate_size: int = 3072          # MLP width, 4E
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77      # T
    hidden_act: str = "quick_gelu"         # x·σ(1.702x) for OpenAI CLIP; "gelu" for OpenCLIP (SD 2.x)
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2                  # 2 is transformers' legacy value: pool at argmax(ids) (EOS has the top id)
    projection_dim: int = 768              # P, width of the contrastive projection (CLIP training; SDXL's pooled)
    with_projection: bool = False          # build `text_projection` (SDXL's bigG encoder: CLIPTextModelWithProjection)

    def __post_init__(self):
        """Sane ranges before any module is built (a config file is input like any other)."""
        name = "TextEncoderConfig"
        check_int(name, "vocab_size", self.vocab_size, 1, 1_000_000)
        check_int(name, "hidden_size", self.hidden_size, 1, 8192)
        check_int(name, "intermediate_size", self.intermediate_size, 1, 65536)
        check_int(name, "num_hidden_layers", self.num_hidden_layers, 1, 64)
        check_int(name, "num_attention_heads", self.num_attention_heads, 1, 256)
        check_int(name, "max_position_embeddings", self.max_position_embeddings, 1, 4096)
        check_float(name, "layer_norm_eps", self.layer_norm_eps, 0.0, 1.0, lo_open=True)
        check_int(name, "eos_token_id", self.eos_token_id, 0, self.vocab_size - 1)
        check_int(name, "projection_dim", self.projection_dim, 1, 8192)
        check_bool(name, "with_projection", self.with_projection)
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not in {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must divide by heads {self.num_attention_heads}")

    @classmethod
    def from_transformers(cls, cfg: dict) -> TextEncoderConfig:
        """Read a transformers `text_encoder/config.json` (CLIPTextModel); absent keys take its defaults."""
        if cfg.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
            raise ValueError(f"text encoder model_type {cfg['model_type']!r} is not a CLIP text model")
        if "text_config" in cfg:  # a full CLIPModel config
            cfg = cfg["text_config"]
        return cls(vocab_size=cfg.get("vocab_size", 49408), hidden_size=cfg.get("hidden_size", 512),
                   intermediate_size=cfg.get("intermediate_size", 2048),
                   num_hidden_layers=cfg.get("num_hidden_layers", 12),
                   num_attention_heads=cfg.get("num_attention_heads", 8),
                   max_position_embeddings=cfg.get("max_position_embeddings", 77),
                   hidden_act=cfg.get("hidden_act", "quick_gelu"), layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
                   eos_token_id=cfg.get("eos_token_id", 2), projection_dim=cfg.get("projection_dim", 512),
                   with_projection="CLIPTextModelWithProjection" in (cfg.get("architectures") or ()))

    def to_transformers(self) -> dict:
        architecture = "CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"
        return {"architectures": [architecture], "model_type": "clip_text_model",
                "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "max_position_embeddings": self.max_position_embeddings, "hidden_act": self.hidden_act,
                "layer_norm_eps": self.layer_norm_eps, "bos_token_id": 0, "eos_token_id": self.eos_token_id,
                "pad_token_id": 1, "projection_dim": self.projection_dim, "attention_dropout": 0.0,
                "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02, "torch_dtype": "float32"}


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's cheap approximation of GELU


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with transformers' names (q_proj, k_proj, v_proj, out_proj)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        E = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(E, E) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, T, E = x.shape
        nh = self.heads
        q, k, v = (p(x).view(B, T, nh, E // nh).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, causal=True)  # (B, nh, T, hd)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, E))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)  # computed, never read from a file
        return self.token_embedding(ids) + self.position_embedding(positions)[None]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class TextEncoder(nn.Module):
    """CLIP text transformer: ids (B, T) -> last hidden state (B, T, E), after the final LayerNorm."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.with_projection:  # top-level name, as in CLIPTextModelWithProjection's state dict
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.final_layer_norm.weight.device

    def forward(self, ids: Tensor, clip_skip: int = 0) -> Tensor:
        """`clip_skip=k` stops k layers early (A1111's "clip skip 2" is k=1 here, as in diffusers) and
        still applies the final LayerNorm, as diffusers' pipeline does."""
        layers = self.text_model.encoder.layers
        if not 0 <= clip_skip < len(layers):
            raise ValueError(f"clip_skip must be in [0, {len(layers) - 1}], got {clip_skip}")
        x = self.text_model.embeddings(ids)  # (B, T, E)
        for layer in layers[: len(layers) - clip_skip]:
            x = layer(x)
        return self.text_model.final_layer_norm(x)

    # ─── the vocabulary's rows (textual inversion adds some) ───────────────────────────────────────
    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        """Put in a token embedding (V', E); the config's vocab_size follows, so a saved model loads back."""
        if embedding.embedding_dim != self.config.hidden_size:
            raise ValueError(f"token embedding is {embedding.embedding_dim} wide; expected hidden_size "
                             f"{self.config.hidden_size}")
        self.text_model.embeddings.token_embedding = embedding
        self.config = replace(self.config, vocab_size=embedding.num_embeddings)

    def resize_token_embeddings(self, num_tokens: int) -> nn.Embedding:
        """Keep the first min(V, num_tokens) rows and add zero rows up to num_tokens, as transformers'
        method of the same name does (it starts new rows at the mean instead: they are overwritten here).
        Returns the old embedding module, untouched, to put back with `set_input_embeddings`."""
        old = self.get_input_embeddings()
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens = {num_tokens!r}; expected a positive integer")
        weight = old.weight.new_zeros(num_tokens, old.embedding_dim)  # no random init: the RNG is left alone
        kept = min(old.num_embeddings, num_tokens)
        weight[:kept] = old.weight.detach()[:kept]
        self.set_input_embeddings(nn.Embedding.from_pretrained(weight, freeze=not old.weight.requires_grad))
        return old

    def pooled(self, ids: Tensor, hidden: Tensor) -> Tensor:
        """The vector at each sequence's EOS token (B, E): what CLIP's contrastive head reads."""
        if self.config.eos_token_id == 2:  # legacy configs: EOS is the largest id in the vocabulary
            eos = ids.argmax(dim=-1)
        else:
            eos = (ids == self.config.eos_token_id).int().argmax(dim=-1)
        return hidden[torch.arange(ids.shape[0], device=ids.device), eos]

    def hidden_and_pooled(self, ids: Tensor, skip: int = 1) -> tuple[Tensor, Tensor]:
        """What SDXL reads, in one pass: the hidden state `skip` layers before the last (B, T, E) with no
        final LayerNorm (transformers' `hidden_states[-1 - skip]`; SDXL uses skip=1, the penultimate layer),
        and the pooled vector (B, P): final LayerNorm at EOS, then `text_projection` if the model has one
        (else (B, E), unprojected)."""
        layers = self.text_model.encoder.layers
        if not 0 <= skip < len(layers):
            raise ValueError(f"skip must be in [0, {len(layers) - 1}], got {skip}")
        x = self.text_model.embeddings(ids)  # (B, T, E)
        for i, layer in enumerate(layers):
            x = layer(x)
            if i == len(layers) - 1 - skip:
                hidden = x
        pooled = self.pooled(ids, self.text_model.final_layer_norm(x))  # (B, E)
        if self.config.with_projection:
            pooled = self.text_projection(pooled)  # (B, P)
        return hidden, pooled
