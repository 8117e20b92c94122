"""Reading SDXL weights: the single file of Stability's generative-models repo, and diffusers folders.

The single file (`sd_xl_base_1.0.safetensors`) holds four networks under four prefixes:

    model.diffusion_model.*                 U-Net: SD 1.x's LDM layout (weights.py's table) plus
                                            label_emb.0.{0,2} -> add_embedding.linear_{1,2}
    first_stage_model.*                     VAE: exactly SD 1.x's LDM layout
    conditioner.embedders.0.transformer.*   CLIP ViT-L: already transformers' names (base only)
    conditioner.embedders.N.model.*         OpenCLIP ViT-bigG: OpenCLIP's names, converted below
                                            (N = 1 in the base, 0 in the refiner)

A diffusers folder (`stabilityai/stable-diffusion-xl-base-1.0`) already uses minisd's names, with
`text_encoder_2/` in transformers' `CLIPTextModelWithProjection` layout. Both readers return
`SDXLComponents`; `load_strict` (weights.py) then fills the modules, every key used and every shape checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..diffusion.schedules import SchedulerConfig
from ..models.configs import SDXL_BASE, SDXL_REFINER, SDXLConfig
from ..models.text_encoder import TextEncoderConfig
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from .weights import (
    _IGNORED,
    UNET_PREFIX,
    VAE_PREFIX,
    StateDict,
    WeightsError,
    _conv_attention_to_linear,
    _few,
    _parse_config,
    _rename,
    fix_text_encoder_keys,
    fix_vae_keys,
    read_component,
    read_json,
    unet_prefix_table,
    vae_prefix_table,
)

EMBEDDERS = "conditioner.embedders."
_CLIP_L = ".transformer."  # conditioner.embedders.0.transformer.text_model.* : transformers' CLIPTextModel
_OPENCLIP = ".model."      # conditioner.embedders.N.model.* : OpenCLIP's TextTransformer
# OpenCLIP's temperature (contrastive training only) and sgm's σ table (recomputed from the schedule);
# `position_ids` and LDM's schedule buffers are weights._IGNORED
_IGNORED_SDXL = re.compile(r"^(conditioner\.embedders\.\d+\.model\.logit_scale|denoiser\.sigmas)$")


@dataclass
class SDXLComponents:
    """Configs and state dicts (minisd names) of SDXL's four networks, plus the schedule."""

    unet: tuple[UNetConfig, StateDict]
    vae: tuple[VAEConfig, StateDict]
    text_encoder: tuple[TextEncoderConfig, StateDict] | None  # CLIP ViT-L; None for the refiner
    text_encoder_2: tuple[TextEncoderConfig, StateDict]       # OpenCLIP ViT-bigG with text_projection
    scheduler: SchedulerConfig
    tokenizer_folders: tuple[Path | None, Path | None] = (None, None)  # tokenizer/, tokenizer_2/ of a folder
    sources: dict[str, str] | None = None  # component -> the file its weights came from (for errors)


# ─── the U-Net: SD 1.x's table plus the added embedding ─────────────────────────────────────────────

def sdxl_unet_prefix_table(cfg: UNetConfig) -> list[tuple[str, str, dict]]:
    """weights.py's LDM U-Net table (its Transformer2D inner names are diffusers' already, however many
    transformer_blocks) plus sgm's `label_emb`, the MLP of the size/crop conditioning."""
    table = unet_prefix_table(cfg)
    if cfg.addition_embed_type == "text_time":
        table += [("label_emb.0.0", "add_embedding.linear_1", {}), ("label_emb.0.2", "add_embedding.linear_2", {})]
    return table


# ─── OpenCLIP's text tower <-> transformers' names ─────────────────────────────────────────────────

_OPENCLIP_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                 "positional_embedding": "text_model.embeddings.position_embedding.weight",  # a bare parameter
                 "ln_final.weight": "text_model.final_layer_norm.weight",
                 "ln_final.bias": "text_model.final_layer_norm.bias"}
_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}


def openclip_to_transformers(sd: StateDict, source: str) -> StateDict:
    """OpenCLIP text-tower names -> transformers' `CLIPTextModelWithProjection` names (minisd's), with
    two tensor transforms: `attn.in_proj_*` is q, k, v stacked on dim 0 (nn.MultiheadAttention) and is
    split in three; `text_projection` is applied as x @ P in OpenCLIP, so nn.Linear's weight is Pᵀ."""
    out, unplaced = {}, []
    for key, v in sd.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
        m_qkv = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = v
        elif key == "text_projection":
            out["text_projection.weight"] = v.T.contiguous()  # (E, P) -> Linear weight (P, E)
        elif m_qkv:
            layer, kind = m_qkv.groups()
            for name, part in zip("qkv", v.chunk(3, dim=0)):  # (3E, ...) -> 3 × (E, ...)
                out[f"text_model.encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part.contiguous()
        elif m and m.group(2) in _OPENCLIP_LAYER:
            layer, module, kind = m.groups()
            out[f"text_model.encoder.layers.{layer}.{_OPENCLIP_LAYER[module]}.{kind}"] = v
        else:
            unplaced.append(key)
    if unplaced:
        raise WeightsError(f"{source}: {len(unplaced)} OpenCLIP text-encoder keys have no place: {_few(unplaced)}")
    return out


def transformers_to_openclip(sd: StateDict) -> StateDict:
    """The reverse of `openclip_to_transformers` (q, k, v stacked again; text_projection transposed back)."""
    top = {v: k for k, v in _OPENCLIP_TOP.items()}
    layer_names = {v: k for k, v in _OPENCLIP_LAYER.items()}
    out = {}
    for key, v in sd.items():
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if key in top:
            out[top[key]] = v
        elif key == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif m and m.group(2) == "self_attn.q_proj":
            layer, _, kind = m.groups()
            qkv = [sd[f"text_model.encoder.layers.{layer}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(qkv, dim=0).contiguous()
        elif m and m.group(2) in layer_names:
            out[f"transformer.resblocks.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"] = v
        elif not (m and m.group(2) in ("self_attn.k_proj", "self_attn.v_proj")):
            raise WeightsError(f"text encoder key {key!r} has no OpenCLIP name")
    return out


def fix_projection_text_keys(sd: StateDict) -> StateDict:
    """weights.fix_text_encoder_keys for `CLIPTextModelWithProjection` files: `text_projection.weight`
    stays at the top level (it is not inside text_model)."""
    projection = {k: v for k, v in sd.items() if k.startswith("text_projection.")}
    return fix_text_encoder_keys({k: v for k, v in sd.items() if k not in projection}) | projection


# ─── the single file ────────────────────────────────────────────────────────────────────────────────

def _split(sd: StateDict, source: str) -> tuple[StateDict, StateDict, StateDict | None, StateDict]:
    """The single file's tensors by network: U-Net, VAE, CLIP ViT-L (or None), OpenCLIP bigG; every key
    placed or known to be ignorable."""
    unet, vae, clip_l, bigg, unplaced = {}, {}, {}, {}, []
    for k, v in sd.items():
        m = re.match(r"conditioner\.embedders\.\d+(\.transformer\.|\.model\.)", k)
        if _IGNORED.match(k) or _IGNORED_SDXL.match(k) or k.startswith("model_ema."):
            continue
        if k.startswith(UNET_PREFIX):
            unet[k[len(UNET_PREFIX):]] = v
        elif k.startswith(VAE_PREFIX):
            vae[k[len(VAE_PREFIX):]] = v
        elif m and m.group(1) == _CLIP_L:
            clip_l[k[m.end():]] = v
        elif m:
            bigg[k[m.end():]] = v
        else:
            unplaced.append(k)
    if unplaced:
        raise WeightsError(f"{source}: {len(unplaced)} keys belong to no SDXL network: {_few(unplaced)}")
    for part, what in ((unet, f"U-Net ({UNET_PREFIX}*)"), (vae, f"VAE ({VAE_PREFIX}*)"),
                       (bigg, f"OpenCLIP text encoder ({EMBEDDERS}N.model.*)")):
        if not part:
            raise WeightsError(f"{source} has no {what} keys; not a complete SDXL single file")
    return unet, vae, clip_l or None, bigg


def convert_sdxl_single_file(sd: StateDict, source: str, cfg: SDXLConfig | None = None) -> SDXLComponents:
    """An SDXL single-file state dict -> minisd components. `cfg` gives the configs; by default the preset
    (SDXL_BASE with two text encoders, SDXL_REFINER with bigG only). `load_strict` checks every shape."""
    unet_sd, vae_sd, clip_sd, bigg_sd = _split(sd, source)
    cfg = cfg or (SDXL_BASE if clip_sd is not None else SDXL_REFINER)
    if (clip_sd is None) != (cfg.text_encoder is None):
        raise WeightsError(f"{source}: {'no' if clip_sd is None else 'a'} CLIP ViT-L text encoder "
                           f"({EMBEDDERS}0.transformer.*), but the config {'needs' if clip_sd is None else 'has no'} one")
    if "label_emb.0.0.weight" not in unet_sd:
        raise WeightsError(f"{source}: no {UNET_PREFIX}label_emb.0.0.weight; an SDXL U-Net has the size/crop "
                           f"embedding (is this an SD 1.x or 2.x file?)")
    text = (cfg.text_encoder, fix_text_encoder_keys(clip_sd)) if clip_sd is not None else None
    return SDXLComponents(
        unet=(cfg.unet, _rename(unet_sd, sdxl_unet_prefix_table(cfg.unet), source)),
        vae=(cfg.vae, _conv_attention_to_linear(_rename(vae_sd, vae_prefix_table(cfg.vae), source))),
        text_encoder=text, text_encoder_2=(cfg.text_encoder_2, openclip_to_transformers(bigg_sd, source)),
        scheduler=cfg.scheduler)


def to_sdxl_single_file(c: SDXLComponents) -> StateDict:
    """minisd components -> one generative-models-layout state dict (the reverse of `convert_sdxl_single_file`)."""
    (ucfg, usd), (vcfg, vsd) = c.unet, c.vae
    unet = _rename(usd, sdxl_unet_prefix_table(ucfg), "unet", reverse=True)
    out = {UNET_PREFIX + k: v for k, v in unet.items()}
    for k, v in _rename(vsd, vae_prefix_table(vcfg), "vae", reverse=True).items():
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", k):
            v = v[:, :, None, None]  # Linear -> LDM's 1×1 conv
        out[VAE_PREFIX + k] = v
    bigg_index = 0
    if c.text_encoder is not None:
        out.update({f"{EMBEDDERS}0{_CLIP_L}{k}": v for k, v in c.text_encoder[1].items()})
        bigg_index = 1
    out.update({f"{EMBEDDERS}{bigg_index}{_OPENCLIP}{k}": v
                for k, v in transformers_to_openclip(c.text_encoder_2[1]).items()})
    return out


# ─── diffusers folders ─────────────────────────────────────────────────────────────────────────────

def read_sdxl_folder(folder: Path, variant: str | None = None) -> SDXLComponents:
    """A diffusers SDXL pipeline folder (base: text_encoder/ and text_encoder_2/; refiner: text_encoder_2/ only)."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise WeightsError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    index = read_json(index_path, "model_index.json")
    if "text_encoder_2" not in index:
        raise WeightsError(f"{folder} has no text_encoder_2 in model_index.json: not an SDXL pipeline")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = _parse_config(sched_path, SchedulerConfig.from_diffusers,
                              read_json(sched_path) if sched_path.is_file() else {})
    unet_cfg, usd, usrc = read_component(folder, "unet", variant, UNetConfig.from_diffusers, scheduler.prediction_type)
    vae_cfg, vsd, vsrc = read_component(folder, "vae", variant, VAEConfig.from_diffusers)
    sources = {"unet": usrc, "vae": vsrc}
    text = None
    if (index.get("text_encoder") or [None])[0] is not None:  # the refiner lists it as [null, null]
        t_cfg, tsd, sources["text_encoder"] = read_component(folder, "text_encoder", variant,
                                                             TextEncoderConfig.from_transformers)
        text = (t_cfg, fix_text_encoder_keys(tsd))
    t2_cfg, t2sd, sources["text_encoder_2"] = read_component(folder, "text_encoder_2", variant,
                                                             TextEncoderConfig.from_transformers)
    components = SDXLComponents(
        unet=(unet_cfg, usd), vae=(vae_cfg, fix_vae_keys(vsd)), text_encoder=text,
        text_encoder_2=(t2_cfg, fix_projection_text_keys(t2sd)), scheduler=scheduler,
        tokenizer_folders=tuple(p if p.is_dir() else None for p in (folder / "tokenizer", folder / "tokenizer_2")),
        sources=sources)
    _check_sdxl(components, folder)
    return components


def _check_sdxl(c: SDXLComponents, source: Path) -> None:
    """The four configs fit together as an SDXL model (one ValueError line), before any module is built."""
    try:
        SDXLConfig(unet=c.unet[0], vae=c.vae[0], text_encoder=c.text_encoder[0] if c.text_encoder else None,
                   text_encoder_2=c.text_encoder_2[0], scheduler=c.scheduler)
    except ValueError as e:
        raise WeightsError(f"{source}: {e}") from e
