"""The MMDiT of Stable Diffusion 3 / 3.5: a transformer over image patches and text tokens together.

Legend: B batch, C latent channels (16), H,W latent height/width, p patch size (2), h,w = H/p, W/p,
L = h·w image tokens, T text tokens (77 CLIP + 256 T5 = 333), D = nh·hd model width, nh heads, hd head dim.

    z_t (B,C,H,W) ─ 2×2 patches + 2-D sin-cos positions ─ x (B,L,D) ─┐
    context (B,T,4096) ─ context_embedder ─────────────── c (B,T,D) ─┼─ N × joint block ─ adaLN, proj_out ─ unpatchify
    t, pooled text (B,2048) ─ sin(t) MLP + pooled MLP ─ emb (B,D) ───┘   (emb modulates every norm)   (B,C,H,W)

Esser et al. 2024 ("Scaling Rectified Flow Transformers", §4, fig. 2): the image and the text each keep
their own weights (projections, MLPs, norms) but meet in one attention over the concatenated sequence,

    [q_x; q_c], [k_x; k_c], [v_x; v_c]  ─ softmax(q kᵀ / √hd) v ─ split back into x (L rows) and c (T rows)

so text tokens are updated by the image as much as the image by the text ("multi-modal" DiT). Every
norm is adaLN-Zero (Peebles & Xie 2023, DiT §3.2): LayerNorm without affine weights, then a scale and
shift regressed from emb, and each residual branch is multiplied by a gate regressed from emb,

    x ← x + g₁ ⊙ Attn((1 + s₁) ⊙ LN(x) + b₁),    x ← x + g₂ ⊙ MLP((1 + s₂) ⊙ LN(x) + b₂)

(the "Zero": with g initialised to 0 a block starts as the identity). The last block updates only x: its
text stream ends after the attention (`context_pre_only`). SD 3.5 adds RMSNorm on q and k per head (QK
norm, Dehghani et al. 2023) and, in its Medium model, a second self-attention over the image tokens alone
in the first 13 blocks (`dual_attention_layers`, "MMDiT-X"), modulated by three more emb vectors.

Attribute names follow diffusers' `SD3Transformer2DModel`, so its checkpoints load with no key map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import as_tuple, check_choice, check_int
from ..nn.attention import attention, attention_probs
from ..nn.layers import TimestepEmbedding, timestep_embedding


@dataclass(frozen=True)
class MMDiTConfig:
    sample_size: int = 128                 # native latent size (×8 = 1024 px); sets the positions' scale
    patch_size: int = 2                    # p: each p×p latent patch is one token
    in_channels: int = 16                  # C: SD 3's VAE has 16 latent channels
    out_channels: int = 16                 # predicted velocity channels
    num_layers: int = 24                   # N joint blocks (SD 3 Medium: 24 = "depth"; 3.5 Large: 38)
    num_attention_heads: int = 24          # nh (= depth in SD 3's scaling rule)
    attention_head_dim: int = 64           # hd; D = nh·hd = 1536 for SD 3 Medium
    joint_attention_dim: int = 4096        # width of the text tokens: T5-XXL's 4096 (CLIP's 2048, zero-padded)
    caption_projection_dim: int = 1536     # context_embedder output: must be D, the joint attention's width
    pooled_projection_dim: int = 2048      # pooled CLIP-L (768) + CLIP-G (1280) vectors
    pos_embed_max_size: int = 192          # side of the stored position table, in patches (192·p·8 = 3072 px)
    dual_attention_layers: tuple[int, ...] = ()  # blocks with the image-only attn2 (SD 3.5 Medium: 0..12)
    qk_norm: str | None = None             # "rms_norm" (SD 3.5): RMSNorm on q and k of each head

    def __post_init__(self):
        """Sane ranges before any module is built (a config file is input like any other)."""
        name = "MMDiTConfig"
        check_int(name, "sample_size", self.sample_size, 1, 4096)
        check_int(name, "patch_size", self.patch_size, 1, 16)
        for field in ("in_channels", "out_channels"):
            check_int(name, field, getattr(self, field), 1, 256)
        check_int(name, "num_layers", self.num_layers, 1, 128)
        check_int(name, "num_attention_heads", self.num_attention_heads, 1, 256)
        check_int(name, "attention_head_dim", self.attention_head_dim, 2, 1024)
        for field in ("joint_attention_dim", "caption_projection_dim", "pooled_projection_dim"):
            check_int(name, field, getattr(self, field), 1, 65536)
        check_int(name, "pos_embed_max_size", self.pos_embed_max_size, 1, 1024)
        if not isinstance(self.dual_attention_layers, tuple):
            raise ValueError(f"{name}.dual_attention_layers = {self.dual_attention_layers!r}; expected a list")
        for i in self.dual_attention_layers:
            check_int(name, "dual_attention_layers", i, 0, self.num_layers - 1)
        check_choice(name, "qk_norm", self.qk_norm, (None, "rms_norm"))
        if self.caption_projection_dim != self.dim:
            raise ValueError(f"{name}.caption_projection_dim = {self.caption_projection_dim}; expected "
                             f"num_attention_heads · attention_head_dim = {self.dim} (text and image share attention)")
        if self.dim % 4:
            raise ValueError(f"{name}: width {self.dim} must divide by 4 (2-D sin-cos positions)")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim  # D

    @classmethod
    def from_diffusers(cls, cfg: dict) -> MMDiTConfig:
        """Read a diffusers `transformer/config.json` (SD3Transformer2DModel); absent keys take its defaults."""
        if cfg.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
            raise ValueError(f"transformer _class_name {cfg['_class_name']!r}; expected 'SD3Transformer2DModel'")
        dual = as_tuple("MMDiTConfig", "dual_attention_layers", cfg.get("dual_attention_layers") or ())
        return cls(sample_size=cfg.get("sample_size", 128), patch_size=cfg.get("patch_size", 2),
                   in_channels=cfg.get("in_channels", 16), out_channels=cfg.get("out_channels") or 16,
                   num_layers=cfg.get("num_layers", 18), num_attention_heads=cfg.get("num_attention_heads", 18),
                   attention_head_dim=cfg.get("attention_head_dim", 64),
                   joint_attention_dim=cfg.get("joint_attention_dim", 4096),
                   caption_projection_dim=cfg.get("caption_projection_dim", 1152),
                   pooled_projection_dim=cfg.get("pooled_projection_dim", 2048),
                   pos_embed_max_size=cfg.get("pos_embed_max_size", 96), dual_attention_layers=dual,
                   qk_norm=cfg.get("qk_norm"))

    def to_diffusers(self) -> dict:
        return {"_class_name": "SD3Transformer2DModel", "sample_size": self.sample_size,
                "patch_size": self.patch_size, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "num_layers": self.num_layers, "num_attention_heads": self.num_attention_heads,
                "attention_head_dim": self.attention_head_dim, "joint_attention_dim": self.joint_attention_dim,
                "caption_projection_dim": self.caption_projection_dim,
                "pooled_projection_dim": self.pooled_projection_dim, "pos_embed_max_size": self.pos_embed_max_size,
                "dual_attention_layers": list(self.dual_attention_layers), "qk_norm": self.qk_norm}


# ─── embeddings ────────────────────────────────────────────────────────────────────────────────────

def sincos_pos_embed_2d(dim: int, grid: int, base_size: int) -> Tensor:
    """The fixed 2-D sin-cos position table (M·M, D) of a grid × grid patch layout, row-major.

    Position (r, c) is scaled to (r, c)·base/M, so the native h = w = base patches span the positions 0..base;
    the first D/2 channels encode the column c, the last D/2 the row r, each as in Vaswani et al. 2017:

        [sin(c·ω_0), …, sin(c·ω_{D/4−1}), cos(c·ω_0), …],   ω_i = 10000^(−i / (D/4))

    computed in float64 and stored in float32, as diffusers' `get_2d_sincos_pos_embed` does.
    """
    pos = torch.arange(grid, dtype=torch.float32) / (grid / base_size)  # float32 first: same rounding as diffusers
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)

    def one_axis(p: Tensor) -> Tensor:  # (M·M,) -> (M·M, D/2)
        angles = torch.outer(p.double(), omega)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    row, col = torch.meshgrid(pos, pos, indexing="ij")  # (M, M) each
    return torch.cat([one_axis(col.reshape(-1)), one_axis(row.reshape(-1))], dim=1).float()  # (M·M, D)


class PatchEmbed(nn.Module):
    """z (B,C,H,W) -> tokens (B,L,D): a p×p stride-p conv, plus the centre h×w crop of the position table.

    The table covers pos_embed_max_size² patches; a smaller latent reads the crop centred in it, so one
    table serves every aspect ratio up to (pos_embed_max_size · p · 8) px (SD 3's "position grid cropping").
    """

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.patch_size, self.max_size = cfg.patch_size, cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        table = sincos_pos_embed_2d(cfg.dim, cfg.pos_embed_max_size, base_size=cfg.sample_size // cfg.patch_size)
        self.register_buffer("pos_embed", table[None])  # (1, M·M, D); saved in the checkpoint as diffusers does

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        M = self.max_size
        if h > M or w > M:
            raise ValueError(f"latent of {h}×{w} patches is larger than the position table's {M}×{M} "
                             f"(pos_embed_max_size); expected at most {M * self.patch_size} latent pixels a side")
        top, left = (M - h) // 2, (M - w) // 2
        table = self.pos_embed.reshape(1, M, M, -1)[:, top:top + h, left:left + w, :]  # (1, h, w, D)
        return table.reshape(1, h * w, -1)  # (1, L, D)

    def forward(self, z: Tensor) -> Tensor:
        H, W = z.shape[-2:]
        p = self.patch_size
        x = self.proj(z).flatten(2).transpose(1, 2)  # (B, L, D)
        return (x + self.cropped_pos_embed(H // p, W // p)).to(x.dtype)


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """emb = MLP_t(sin-cos(t), 256 channels) + MLP_y(pooled text): the vector that modulates every norm."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)   # Linear, SiLU, Linear
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # same shape of MLP (diffusers' PixArt projection)

    def forward(self, t: Tensor, pooled: Tensor) -> Tensor:
        sin_t = timestep_embedding(t, 256, flip_sin_to_cos=True).to(pooled.dtype)  # (B, 256): [cos, sin]
        return self.timestep_embedder(sin_t) + self.text_embedder(pooled)  # (B, D)


# ─── norms and modulation ──────────────────────────────────────────────────────────────────────────

def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """(1 + s) ⊙ x + b with one (s, b) per sample: x (B, L, D), shift and scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nn.Module):
    """LN(x) without affine weights, and the n modulation vectors Linear(SiLU(emb)).chunk(n): 6 per stream
    (shift, scale, gate for the attention, then for the MLP), 9 with the dual attention (+ attn2's three)."""

    def __init__(self, dim: int, n: int = 6):
        super().__init__()
        self.n = n
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, n * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return self.norm(x), self.linear(self.silu(emb)).chunk(self.n, dim=1)  # (B, L, D), n × (B, D)


class AdaLayerNormContinuous(nn.Module):
    """(1 + s) ⊙ LN(x) + b, with [s, b] = Linear(SiLU(emb)) (scale first): the last block's text norm and
    norm_out. No gate: nothing is added back to a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.linear(self.silu(emb).to(x.dtype)).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)


class RMSNorm(nn.Module):
    """x / √(mean(x²) + ε) · w over the last dim (Zhang & Sennrich 2019); statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


# ─── attention and blocks ──────────────────────────────────────────────────────────────────────────

class JointAttention(nn.Module):
    """Attention over [image; text] with separate q/k/v/out projections per stream (`add_*` for the text).

    `context_dim=None` is plain self-attention over the image (SD 3.5's attn2); `context_out=False` (the
    last block) drops the text output's projection, since nothing reads the text stream afterwards.
    """

    capture = None  # a list while `nn.attention.capture_attention` records: each call's image→text block,
    records_cross = True  # which it counts among the cross-attention maps (the U-Net's attn2)

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None, joint: bool, context_out: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])  # .1: dropout, no weights
        self.norm_q = RMSNorm(head_dim) if qk_norm else None
        self.norm_k = RMSNorm(head_dim) if qk_norm else None
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.to_add_out = nn.Linear(inner, dim) if context_out else None
            self.norm_added_q = RMSNorm(head_dim) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim) if qk_norm else None

    def heads_of(self, y: Tensor, norm: RMSNorm | None) -> Tensor:
        B, N, _ = y.shape
        y = y.view(B, N, self.heads, -1).transpose(1, 2)  # (B, nh, N, hd)
        return y if norm is None else norm(y)

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        B, L, _ = x.shape
        q = self.heads_of(self.to_q(x), self.norm_q)  # (B, nh, L, hd)
        k = self.heads_of(self.to_k(x), self.norm_k)
        v = self.heads_of(self.to_v(x), None)
        if c is not None:  # text tokens join the sequence: (B, nh, L + T, hd)
            q = torch.cat([q, self.heads_of(self.add_q_proj(c), self.norm_added_q)], dim=2)
            k = torch.cat([k, self.heads_of(self.add_k_proj(c), self.norm_added_k)], dim=2)
            v = torch.cat([v, self.heads_of(self.add_v_proj(c), None)], dim=2)
        if self.capture is not None and c is not None:  # notebook 18: image rows, text columns (B, nh, L, T)
            probs = attention_probs(q, k)
            self.capture.append(probs[:, :, :L, L:].detach().cpu())
            out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, q.shape[2], -1)
        else:
            out = attention(q, k, v).transpose(1, 2).reshape(B, q.shape[2], -1)  # (B, L [+ T], nh·hd)
        x_out, c_out = out[:, :L], out[:, L:]
        c_out = self.to_add_out(c_out) if c is not None and self.to_add_out is not None else None
        return self.to_out[0](x_out), c_out


class FeedForward(nn.Module):
    """W₂ GELU_tanh(W₁ x), 4× wide; names net.0.proj, net.2 as in diffusers."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, mult * dim)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class JointTransformerBlock(nn.Module):
    """One MMDiT block: adaLN-Zero on each stream, joint attention, per-stream gated MLPs (module docstring)."""

    def __init__(self, cfg: MMDiTConfig, context_pre_only: bool, dual: bool):
        super().__init__()
        D, nh, hd = cfg.dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZero(D, 9 if dual else 6)
        self.norm1_context = AdaLayerNormContinuous(D) if context_pre_only else AdaLayerNormZero(D)
        self.attn = JointAttention(D, nh, hd, cfg.qk_norm, joint=True, context_out=not context_pre_only)
        self.attn2 = JointAttention(D, nh, hd, cfg.qk_norm, joint=False, context_out=False) if dual else None
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(D)
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(D)

    def forward(self, x: Tensor, c: Tensor, emb: Tensor) -> tuple[Tensor | None, Tensor]:
        """x (B,L,D) image tokens, c (B,T,D) text tokens, emb (B,D) -> (c or None after the last block, x)."""
        h, (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *dual) = self.norm1(x, emb)
        if self.context_pre_only:
            c_in = self.norm1_context(c, emb)
        else:
            hc, (c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(c, emb)
            c_in = modulate(hc, c_shift_msa, c_scale_msa)

        x_attn, c_attn = self.attn(modulate(h, shift_msa, scale_msa), c_in)  # the one place the streams meet
        x = x + gate_msa[:, None] * x_attn
        if self.attn2 is not None:  # SD 3.5 Medium: the image attends to itself alone, from the same LN(x)
            shift_msa2, scale_msa2, gate_msa2 = dual
            x = x + gate_msa2[:, None] * self.attn2(modulate(h, shift_msa2, scale_msa2))[0]
        x = x + gate_mlp[:, None] * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return None, x

        c = c + c_gate_msa[:, None] * c_attn
        c = c + c_gate_mlp[:, None] * self.ff_context(modulate(self.norm2_context(c), c_shift_mlp, c_scale_mlp))
        return c, x


# ─── the model ─────────────────────────────────────────────────────────────────────────────────────

class MMDiT(nn.Module):
    """v̂ = MMDiT(z_t, context, pooled, t): SD 3's velocity predictor (diffusers' SD3Transformer2DModel)."""

    def __init__(self, cfg: MMDiTConfig = MMDiTConfig()):
        super().__init__()
        self.config = cfg
        D, N = cfg.dim, cfg.num_layers
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(D, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            [JointTransformerBlock(cfg, context_pre_only=i == N - 1, dual=i in cfg.dual_attention_layers)
             for i in range(N)])
        self.norm_out = AdaLayerNormContinuous(D)
        self.proj_out = nn.Linear(D, cfg.patch_size ** 2 * cfg.out_channels)

    def init_adaln_zero_(self) -> MMDiT:
        """DiT's initialisation for training from scratch (Peebles & Xie 2023, §3.2): every modulation Linear
        and the output projection at zero, so each gate is 0, each block the identity and the output 0.
        (Loaded checkpoints are left alone: diffusers' own constructor uses the default init.)"""
        zeroed = [self.proj_out, self.norm_out.linear]
        for block in self.transformer_blocks:
            zeroed += [block.norm1.linear, block.norm1_context.linear]
        for layer in zeroed:
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)
        return self

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                timestep: Tensor | float) -> Tensor:
        """hidden_states z_t (B,C,H,W), encoder_hidden_states (B,T,joint_attention_dim), pooled_projections
        (B,pooled_projection_dim), timestep t (B,) or a scalar, in 0..1000 -> predicted velocity (B,C_out,H,W)."""
        z, context, pooled = hidden_states, encoder_hidden_states, pooled_projections
        self.check_inputs(z, context, pooled)
        B, _, H, W = z.shape
        p = self.config.patch_size
        t = torch.as_tensor(timestep, device=z.device).reshape(-1).expand(B)

        x = self.pos_embed(z)                              # (B, L, D), L = (H/p)·(W/p)
        emb = self.time_text_embed(t, pooled)              # (B, D)
        c = self.context_embedder(context)                 # (B, T, D)
        for block in self.transformer_blocks:
            c, x = block(x, c, emb)
        x = self.proj_out(self.norm_out(x, emb))           # (B, L, p·p·C_out)

        h, w, C = H // p, W // p, self.config.out_channels  # unpatchify: token (i, j) -> pixels (i·p.., j·p..)
        x = x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(B, C, h * p, w * p)

    def check_inputs(self, z: Tensor, context: Tensor, pooled: Tensor) -> None:
        cfg = self.config
        if z.ndim != 4 or z.shape[1] != cfg.in_channels:
            raise ValueError(f"latents of shape {tuple(z.shape)}; expected (B, {cfg.in_channels}, H, W)")
        if z.shape[2] % cfg.patch_size or z.shape[3] % cfg.patch_size:
            raise ValueError(f"latent size {z.shape[2]}×{z.shape[3]}; expected multiples of the patch size "
                             f"{cfg.patch_size}")
        if context.ndim != 3 or context.shape[2] != cfg.joint_attention_dim:
            raise ValueError(f"text embeddings of shape {tuple(context.shape)}; expected "
                             f"(B, T, {cfg.joint_attention_dim})")
        if pooled.ndim != 2 or pooled.shape[1] != cfg.pooled_projection_dim:
            raise ValueError(f"pooled text embeddings of shape {tuple(pooled.shape)}; expected "
                             f"(B, {cfg.pooled_projection_dim})")
