"""Reading and writing SD 3 weights: diffusers folders and the original single file.

A diffusers folder (`stabilityai/stable-diffusion-3-medium-diffusers`) already uses minisd's names:

    transformer/     SD3Transformer2DModel: models/mmdit.py loads it with no key map
    vae/             AutoencoderKL with 16 latent channels, a shift_factor and no quant convs
    text_encoder/    CLIP ViT-L with text_projection (CLIPTextModelWithProjection)
    text_encoder_2/  OpenCLIP ViT-bigG, in transformers' CLIPTextModelWithProjection layout
    text_encoder_3/  T5 v1.1 XXL's encoder (optional: without it the T5 tokens are zeros)
    tokenizer/, tokenizer_2/ (CLIP BPE), tokenizer_3/ (T5's tokenizer.json), scheduler/ (FlowMatchEuler)

The shapes world's tiny SD 3 has one CLIP text encoder (no projection) and neither text_encoder_2 nor 3.

The single file (`sd3_medium.safetensors` and the files that include the text encoders) holds

    model.diffusion_model.*                  the MMDiT in Stability's names (below), qkv fused
    first_stage_model.*                      the VAE: SD 1.x's LDM layout without quant_conv/post_quant_conv
    text_encoders.clip_l.transformer.*       CLIP ViT-L, transformers' names; SD 3's own files have no
                                             text_projection (its pooled vector is unprojected): read as the
                                             identity, as diffusers does; minisd writes the one it holds
    text_encoders.clip_g.transformer.*       bigG, transformers' names (text_projection included)
    text_encoders.t5xxl.transformer.*        T5, transformers' names (optional)

MMDiT names, Stability -> diffusers (`convert_sd3_transformer_checkpoint_to_diffusers` in diffusers'
loaders/single_file_utils.py is the reference): a prefix table for the modules that only change name, and
two tensor transforms — `attn.qkv` is q, k, v stacked on dim 0 and is split in three, and the final
adaLN (and the last block's text adaLN) emit (shift, scale) where diffusers' emit (scale, shift).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..diffusion.schedules import SchedulerConfig
from ..models.configs import SDXL_BASE
from ..models.mmdit import MMDiTConfig
from ..models.sd3_configs import SD3_MEDIUM, T5_XXL
from ..models.t5 import T5Config
from ..models.text_encoder import TextEncoderConfig
from ..models.vae import VAEConfig
from .sdxl import fix_projection_text_keys
from .weights import (
    _IGNORED,
    VAE_PREFIX,
    StateDict,
    WeightsError,
    _conv_attention_to_linear,
    _few,
    _infer_text_config,
    _parse_config,
    _rename,
    find_weights,
    fix_vae_keys,
    read_json,
    read_state_dict,
    vae_prefix_table,
)

MMDIT_PREFIX = "model.diffusion_model."
TEXT_PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.",
                 "text_encoder_2": "text_encoders.clip_g.transformer.",
                 "text_encoder_3": "text_encoders.t5xxl.transformer."}
# CLIP's temperature (contrastive training only), which some files keep beside each CLIP
_IGNORED_SD3 = re.compile(r"^text_encoders\.clip_[lg]\.(transformer\.)?logit_scale$")
STEMS = {"transformer": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
         "text_encoder": ("model", "pytorch_model"), "text_encoder_2": ("model", "pytorch_model"),
         "text_encoder_3": ("model", "pytorch_model")}


# ─── the pipeline's networks together ──────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class SD3Config:
    """SD 3's networks (Esser et al. 2024, §5.2.1): an MMDiT, a 16-channel VAE, CLIP ViT-L and bigG (each's
    penultimate hidden state, joined on channels, zero-padded to the T5 width; their projected EOS vectors
    joined: the pooled text) and T5-XXL (its tokens after CLIP's 77), with a flow-matching schedule.

    The tiny variant (the shapes world): one CLIP encoder without projection, whose last hidden state is the
    context (joint_attention_dim = E) and whose final-LayerNorm EOS state the pooled text (width E)."""

    transformer: MMDiTConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig                 # CLIP ViT-L (with projection); the tiny variant's only encoder
    text_encoder_2: TextEncoderConfig | None        # OpenCLIP bigG (with projection); None: the tiny variant
    text_encoder_3: T5Config | None                 # T5 v1.1 XXL; None: zeros in its place (or the tiny variant)
    scheduler: SchedulerConfig

    def __post_init__(self):
        m, te, te2, t5 = self.transformer, self.text_encoder, self.text_encoder_2, self.text_encoder_3
        if self.scheduler.prediction_type != "flow":
            raise ValueError(f"SD3Config: the scheduler's prediction_type is {self.scheduler.prediction_type!r}; an "
                             f"MMDiT predicts a flow velocity (FlowMatchEulerDiscreteScheduler, 'flow')")
        if (m.in_channels, m.out_channels) != (self.vae.latent_channels,) * 2:
            raise ValueError(f"SD3Config: the transformer reads {m.in_channels} and writes {m.out_channels} channels; "
                             f"the VAE's latents have {self.vae.latent_channels}")
        if te2 is None:
            return self._check_tiny()
        if not (te.with_projection and te2.with_projection):
            raise ValueError("SD3Config: both CLIP text encoders need text_projection (with_projection=True)")
        width, pooled = te.hidden_size + te2.hidden_size, te.projection_dim + te2.projection_dim
        if pooled != m.pooled_projection_dim:
            raise ValueError(f"SD3Config: the CLIP encoders' pooled vectors are {pooled} wide; the transformer's "
                             f"pooled_projection_dim is {m.pooled_projection_dim}")
        if width > m.joint_attention_dim or (t5 is not None and t5.d_model != m.joint_attention_dim):
            t5_width = f", T5's {t5.d_model}" if t5 is not None else ""
            raise ValueError(f"SD3Config: the transformer's joint_attention_dim {m.joint_attention_dim} must equal the "
                             f"T5 width and hold the CLIP widths joined (CLIP {width}{t5_width})")

    def _check_tiny(self) -> None:
        m, te = self.transformer, self.text_encoder
        if self.text_encoder_3 is not None or te.with_projection:
            raise ValueError("SD3Config: with one CLIP text encoder (no text_encoder_2, the tiny variant) there is "
                             "no T5 and no text_projection")
        if m.joint_attention_dim != te.hidden_size or m.pooled_projection_dim != te.hidden_size:
            raise ValueError(f"SD3Config: the text encoder is {te.hidden_size} wide; the transformer's "
                             f"joint_attention_dim ({m.joint_attention_dim}) and pooled_projection_dim "
                             f"({m.pooled_projection_dim}) must be too")

    @property
    def tiny(self) -> bool:
        return self.text_encoder_2 is None

    @property
    def image_size(self) -> int:
        """Native image size in pixels: the transformer's latent size × the VAE's downsampling (1024 for SD 3)."""
        return self.transformer.sample_size * self.vae.downsampling

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SD3Config:
        d = json.loads(text)
        tuples = lambda c: {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}  # noqa: E731
        te2, t5 = d.get("text_encoder_2"), d.get("text_encoder_3")
        return cls(transformer=MMDiTConfig(**tuples(d["transformer"])), vae=VAEConfig(**tuples(d["vae"])),
                   text_encoder=TextEncoderConfig(**d["text_encoder"]),
                   text_encoder_2=TextEncoderConfig(**te2) if te2 is not None else None,
                   text_encoder_3=T5Config(**t5) if t5 is not None else None,
                   scheduler=SchedulerConfig(**d["scheduler"]))


# SD 3 Medium's other networks, as its diffusers repo's config.json files have them (the single file has none)
SD3_VAE = VAEConfig(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                    use_post_quant_conv=False, sample_size=1024, force_upcast=True)
CLIP_L = replace(SDXL_BASE.text_encoder, with_projection=True)  # CLIP ViT-L/14, P = 768
CLIP_G = SDXL_BASE.text_encoder_2                                # OpenCLIP ViT-bigG/14, P = 1280
SD3_SCHEDULER = SchedulerConfig(prediction_type="flow", shift=3.0)
SD3_MEDIUM_PIPELINE = SD3Config(transformer=SD3_MEDIUM, vae=SD3_VAE, text_encoder=CLIP_L, text_encoder_2=CLIP_G,
                                text_encoder_3=T5_XXL, scheduler=SD3_SCHEDULER)


@dataclass
class SD3Components:
    """Configs and state dicts (minisd names) of SD 3's networks, plus the schedule."""

    transformer: tuple[MMDiTConfig, StateDict]
    vae: tuple[VAEConfig, StateDict]
    text_encoder: tuple[TextEncoderConfig, StateDict]
    text_encoder_2: tuple[TextEncoderConfig, StateDict] | None
    text_encoder_3: tuple[T5Config, StateDict] | None
    scheduler: SchedulerConfig
    tokenizer_folders: tuple[Path | None, Path | None, Path | None] = (None, None, None)  # tokenizer/, _2/, _3/
    sources: dict[str, str] | None = None  # component -> the file its weights came from (for errors)

    def config(self, source: str | Path) -> SD3Config:
        """The networks' configs together, checked: one WeightsError line naming `source` when they do not fit."""
        part = lambda p: p[0] if p is not None else None  # noqa: E731
        try:
            return SD3Config(self.transformer[0], self.vae[0], self.text_encoder[0], part(self.text_encoder_2),
                             part(self.text_encoder_3), self.scheduler)
        except ValueError as e:
            raise WeightsError(f"{source}: {e}") from e


def fix_t5_keys(sd: StateDict) -> StateDict:
    """T5's token embedding is one tensor under two names (`shared`, `encoder.embed_tokens`, tied): files carry
    either or both (transformers writes `shared` alone); minisd's module has both, the same tensor."""
    sd = dict(sd)
    for a, b in (("shared.weight", "encoder.embed_tokens.weight"), ("encoder.embed_tokens.weight", "shared.weight")):
        if a in sd and b not in sd:
            sd[b] = sd[a]
    return sd


def t5_keys_to_save(sd: StateDict) -> StateDict:
    """The T5 state dict as transformers writes it: `shared` alone (safetensors refuses one tensor twice)."""
    return {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}


# ─── the MMDiT: Stability's names <-> diffusers' ──────────────────────────────────────────────────

# the fused q, k, v of each attention and the three projections they split into
_QKV = {"x_block.attn": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "context_block.attn": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "x_block.attn2": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
_QKV_LDM = re.compile(r"joint_blocks\.(\d+)\.(x_block\.attn2?|context_block\.attn)\.qkv\.(weight|bias)")
_QKV_DIFFUSERS = re.compile(r"transformer_blocks\.(\d+)\.(attn2?\.to_q|attn\.add_q_proj)\.(weight|bias)")
_KV_DIFFUSERS = re.compile(r"transformer_blocks\.\d+\.(attn2?\.to_[kv]|attn\.add_[kv]_proj)\.(weight|bias)")


def mmdit_prefix_table(cfg: MMDiTConfig) -> list[tuple[str, str, dict]]:
    """(Stability module, diffusers module, {}) for every MMDiT module that only changes name."""
    table = [("x_embedder.proj", "pos_embed.proj", {}), ("context_embedder", "context_embedder", {}),
             ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1", {}),
             ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2", {}),
             ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1", {}),
             ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2", {}),
             ("final_layer.linear", "proj_out", {}), ("final_layer.adaLN_modulation.1", "norm_out.linear", {})]
    for i in range(cfg.num_layers):
        x, c, b = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
        table += [(f"{x}.adaLN_modulation.1", f"{b}.norm1.linear", {}), (f"{x}.attn.proj", f"{b}.attn.to_out.0", {}),
                  (f"{x}.attn.ln_q", f"{b}.attn.norm_q", {}), (f"{x}.attn.ln_k", f"{b}.attn.norm_k", {}),
                  (f"{x}.mlp.fc1", f"{b}.ff.net.0.proj", {}), (f"{x}.mlp.fc2", f"{b}.ff.net.2", {}),
                  (f"{x}.attn2.proj", f"{b}.attn2.to_out.0", {}), (f"{x}.attn2.ln_q", f"{b}.attn2.norm_q", {}),
                  (f"{x}.attn2.ln_k", f"{b}.attn2.norm_k", {}),
                  (f"{c}.adaLN_modulation.1", f"{b}.norm1_context.linear", {}),
                  (f"{c}.attn.ln_q", f"{b}.attn.norm_added_q", {}), (f"{c}.attn.ln_k", f"{b}.attn.norm_added_k", {})]
        if i < cfg.num_layers - 1:  # the last block's text stream ends after the attention (context_pre_only)
            table += [(f"{c}.attn.proj", f"{b}.attn.to_add_out", {}),
                      (f"{c}.mlp.fc1", f"{b}.ff_context.net.0.proj", {}), (f"{c}.mlp.fc2", f"{b}.ff_context.net.2", {})]
    return table


def _swap_shift_scale(sd: StateDict, cfg: MMDiTConfig) -> StateDict:
    """The modulations without a gate (AdaLayerNormContinuous: norm_out and the last block's text norm) emit
    (shift, scale) in Stability's code and (scale, shift) in diffusers': swap the Linear's two output halves.
    The swap is its own inverse, so both directions use it."""
    swapped = ("norm_out.linear.", f"transformer_blocks.{cfg.num_layers - 1}.norm1_context.linear.")
    return {k: (torch.cat(v.chunk(2, dim=0)[::-1]) if k.startswith(swapped) else v) for k, v in sd.items()}


def mmdit_from_single_file(sd: StateDict, cfg: MMDiTConfig, source: str) -> StateDict:
    """The MMDiT's tensors (prefix removed), Stability's names -> diffusers' (minisd's)."""
    out, rest = {}, {}
    for k, v in sd.items():
        m = _QKV_LDM.fullmatch(k)
        if m:
            i, attn, kind = m.groups()
            for name, part in zip(_QKV[attn], v.chunk(3, dim=0)):  # (3D, ...) -> 3 × (D, ...)
                out[f"transformer_blocks.{i}.{name}.{kind}"] = part.contiguous()
        elif k == "pos_embed":  # a bare buffer, not a module's
            out["pos_embed.pos_embed"] = v
        else:
            rest[k] = v
    out.update(_rename(rest, mmdit_prefix_table(cfg), f"{source} (transformer)"))
    return _swap_shift_scale(out, cfg)


def mmdit_to_single_file(sd: StateDict, cfg: MMDiTConfig) -> StateDict:
    """The reverse of `mmdit_from_single_file` (q, k, v stacked again, shift and scale swapped back)."""
    sd = _swap_shift_scale(sd, cfg)
    out, rest = {}, {}
    names = {v[0]: k for k, v in _QKV.items()}  # "attn.to_q" -> "x_block.attn"
    for k, v in sd.items():
        m = _QKV_DIFFUSERS.fullmatch(k)
        if m:
            i, q_name, kind = m.groups()
            attn = names[q_name]
            parts = [sd[f"transformer_blocks.{i}.{name}.{kind}"] for name in _QKV[attn]]
            out[f"joint_blocks.{i}.{attn}.qkv.{kind}"] = torch.cat(parts, dim=0).contiguous()
        elif k == "pos_embed.pos_embed":
            out["pos_embed"] = v
        elif not _KV_DIFFUSERS.fullmatch(k):  # k and v went into qkv with q
            rest[k] = v
    out.update(_rename(rest, mmdit_prefix_table(cfg), "transformer", reverse=True))
    return out


def infer_mmdit_config(sd: StateDict) -> MMDiTConfig:
    """The MMDiT's shape read off its Stability-named tensors: what shapes cannot say is SD 3's (64-wide
    heads, as every SD 3 and 3.5 model has; a native 128×128 latent, 1024 px)."""
    D, C, p, _ = sd["x_embedder.proj.weight"].shape
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("joint_blocks.")}
    dual = tuple(sorted({int(k.split(".")[1]) for k in sd if ".x_block.attn2." in k}))
    out_channels = sd["final_layer.linear.weight"].shape[0] // p**2
    return MMDiTConfig(sample_size=128, patch_size=p, in_channels=C, out_channels=out_channels, num_layers=len(blocks),
                       num_attention_heads=D // 64, attention_head_dim=64,
                       joint_attention_dim=sd["context_embedder.weight"].shape[1],
                       caption_projection_dim=sd["context_embedder.weight"].shape[0],
                       pooled_projection_dim=sd["y_embedder.mlp.0.weight"].shape[1],
                       pos_embed_max_size=round(sd["pos_embed"].shape[1] ** 0.5), dual_attention_layers=dual,
                       qk_norm="rms_norm" if any(".ln_q." in k for k in sd) else None)


# ─── the single file ───────────────────────────────────────────────────────────────────────────────

def _split(sd: StateDict, source: str) -> dict[str, StateDict]:
    """The single file's tensors by network (prefixes removed); every key placed or known to be ignorable."""
    prefixes = {"transformer": MMDIT_PREFIX, "vae": VAE_PREFIX, **TEXT_PREFIXES}
    parts: dict[str, StateDict] = {name: {} for name in prefixes}
    unplaced = []
    for k, v in sd.items():
        name = next((n for n, prefix in prefixes.items() if k.startswith(prefix)), None)
        if _IGNORED.match(k) or _IGNORED_SD3.match(k):
            continue
        if name is None:
            unplaced.append(k)
        else:
            parts[name][k[len(prefixes[name]):]] = v
    if unplaced:
        raise WeightsError(f"{source}: {len(unplaced)} keys belong to no SD 3 network: {_few(unplaced)}")
    for name, what in (("transformer", f"MMDiT ({MMDIT_PREFIX}*)"), ("vae", f"VAE ({VAE_PREFIX}*)"),
                       ("text_encoder", f"CLIP ViT-L ({TEXT_PREFIXES['text_encoder']}*)")):
        if not parts[name]:
            raise WeightsError(f"{source} has no {what} keys; minisd needs an SD 3 single file that includes the "
                               f"CLIP text encoders (as sd3_medium_incl_clips.safetensors does), or the diffusers "
                               f"folder")
    return parts


def _infer_config(parts: dict[str, StateDict]) -> SD3Config:
    """A real file's configs: the MMDiT's and the encoders' sizes read off the tensors, the rest SD 3 Medium's."""
    clip_l, clip_g, t5 = (fix_projection_text_keys(parts[n]) if n != "text_encoder_3" else parts[n]
                          for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    if not clip_g:
        raise WeightsError("no OpenCLIP bigG text encoder (text_encoders.clip_g.transformer.*); SD 3 needs both CLIPs")
    te = replace(_infer_text_config(clip_l, CLIP_L), with_projection=True)
    te2 = replace(_infer_text_config(clip_g, CLIP_G), with_projection=True,
                  projection_dim=clip_g["text_projection.weight"].shape[0])
    t5_cfg = None
    if t5:
        t5 = fix_t5_keys(t5)
        t5_cfg = replace(T5_XXL, vocab_size=t5["shared.weight"].shape[0], d_model=t5["shared.weight"].shape[1],
                         num_layers=len({k.split(".")[2] for k in t5 if k.startswith("encoder.block.")}))
    vae = replace(SD3_VAE, latent_channels=parts["vae"]["decoder.conv_in.weight"].shape[1])
    return SD3Config(infer_mmdit_config(parts["transformer"]), vae, te, te2, t5_cfg, SD3_SCHEDULER)


def convert_sd3_single_file(sd: StateDict, source: str, metadata: dict[str, str] | None = None) -> SD3Components:
    """An SD 3 single-file state dict -> minisd components. The configs: minisd's, from the file's metadata
    (any size, written by `pipeline_sd3.save_single_file`), else read off the shapes (SD 3 / 3.5 files)."""
    parts = _split(sd, source)
    try:
        saved = (metadata or {}).get("minisd_config")
        cfg = SD3Config.from_json(saved) if saved else _infer_config(parts)
    except WeightsError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise WeightsError(f"{source}: cannot read the SD 3 configs ({type(e).__name__}: {e})") from e
    clip_l = fix_projection_text_keys(parts["text_encoder"])
    if not cfg.tiny and "text_projection.weight" not in clip_l:  # SD 3's CLIP-L pooled vector is unprojected
        dtype = next(iter(clip_l.values())).dtype
        clip_l["text_projection.weight"] = torch.eye(cfg.text_encoder.hidden_size, dtype=dtype)
    present = [n for n in ("text_encoder_2", "text_encoder_3") if parts[n]]
    expected = [n for n in ("text_encoder_2", "text_encoder_3") if getattr(cfg, n) is not None]
    if present != expected:
        raise WeightsError(f"{source} holds {present or 'neither'} of text_encoder_2 (clip_g), text_encoder_3 "
                           f"(t5xxl); its config expects {expected or 'neither'}")
    pair = lambda n, fix: (getattr(cfg, n), fix(parts[n])) if parts[n] else None  # noqa: E731
    vae = _conv_attention_to_linear(_rename(parts["vae"], vae_prefix_table(cfg.vae), f"{source} (vae)"))
    return SD3Components(
        transformer=(cfg.transformer, mmdit_from_single_file(parts["transformer"], cfg.transformer, source)),
        vae=(cfg.vae, vae), text_encoder=(cfg.text_encoder, clip_l),
        text_encoder_2=pair("text_encoder_2", fix_projection_text_keys),
        text_encoder_3=pair("text_encoder_3", fix_t5_keys),
        scheduler=cfg.scheduler)


def to_sd3_single_file(c: SD3Components) -> StateDict:
    """minisd components -> one Stability-layout state dict (the reverse of `convert_sd3_single_file`)."""
    out = {MMDIT_PREFIX + k: v for k, v in mmdit_to_single_file(c.transformer[1], c.transformer[0]).items()}
    for k, v in _rename(c.vae[1], vae_prefix_table(c.vae[0]), "vae", reverse=True).items():
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", k):
            v = v[:, :, None, None]  # Linear -> LDM's 1×1 conv
        out[VAE_PREFIX + k] = v
    for name, prefix in TEXT_PREFIXES.items():
        part = getattr(c, name)
        if part is not None:
            sd = t5_keys_to_save(part[1]) if name == "text_encoder_3" else part[1]
            out.update({prefix + k: v for k, v in sd.items()})
    return out


# ─── diffusers folders ─────────────────────────────────────────────────────────────────────────────

def _listed(index: dict, name: str) -> bool:
    """Whether model_index.json names a component (an absent one is missing or [null, null])."""
    entry = index.get(name)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def read_network(folder: Path, name: str, variant: str | None, parse) -> tuple[object, StateDict, str]:
    """One network of an SD 3 folder: `parse(config dict)`, checked before any weight is read, then its state
    dict and the file it came from."""
    sub = folder / name
    if not sub.is_dir():
        raise WeightsError(f"{folder} has no {name}/ folder; an SD 3 diffusers folder needs transformer/, vae/, "
                           f"text_encoder/ (and text_encoder_2/, text_encoder_3/ where model_index.json names them)")
    config_path = sub / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{sub} has no config.json")
    config = _parse_config(config_path, parse, read_json(config_path))
    files = find_weights(sub, STEMS[name], variant)
    sd: StateDict = {}
    for f in files:
        sd.update(read_state_dict(f))
    return config, sd, str(files[0])


def read_sd3_folder(folder: Path, variant: str | None = None) -> SD3Components:
    """A diffusers SD 3 folder (StableDiffusion3Pipeline), or the tiny variant's (text_encoder/ alone)."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise WeightsError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    index = read_json(index_path, "model_index.json")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = _parse_config(sched_path, SchedulerConfig.from_diffusers, read_json(sched_path) if
                              sched_path.is_file() else {"_class_name": "FlowMatchEulerDiscreteScheduler"})
    parsers = {"transformer": MMDiTConfig.from_diffusers, "vae": lambda cfg: VAEConfig.from_diffusers(cfg, sd3=True),
               "text_encoder": TextEncoderConfig.from_transformers,
               "text_encoder_2": TextEncoderConfig.from_transformers,
               "text_encoder_3": T5Config.from_transformers}
    fixes = {"vae": fix_vae_keys, "text_encoder": fix_projection_text_keys,
             "text_encoder_2": fix_projection_text_keys, "text_encoder_3": fix_t5_keys}
    nets, sources = {}, {}
    for name, parse in parsers.items():
        if name in ("text_encoder_2", "text_encoder_3") and not _listed(index, name):
            nets[name] = None
            continue
        cfg, sd, sources[name] = read_network(folder, name, variant, parse)
        nets[name] = (cfg, fixes.get(name, dict)(sd))
    tokenizers = tuple(p if p.is_dir() else None for p in (folder / "tokenizer", folder / "tokenizer_2",
                                                             folder / "tokenizer_3"))
    components = SD3Components(**nets, scheduler=scheduler, tokenizer_folders=tokenizers, sources=sources)
    components.config(folder)  # the networks fit together, before any module is built
    return components
