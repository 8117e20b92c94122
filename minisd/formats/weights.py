"""Reading and writing Stable Diffusion weights: diffusers folders, single files, the Hub.

Three places weights come from, one place they go (`load_strict`):

* a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, ...): the module names
  already are minisd's, up to two historical spellings (the SD 1.5 VAE's `query/key/value/proj_attn`
  and transformers' `text_model.` prefix, present or not);
* a single-file (LDM) checkpoint, `.safetensors` or `.ckpt`: one converter made of the prefix table
  below (`unet_prefix_table`, `vae_prefix_table`) plus a few named tensor transforms;
* a Hub repo id, fetched with `huggingface_hub` into the usual cache.

Pickled files (`.ckpt`, `.bin`, `.pt`, `.pth`) are read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..diffusion.schedules import SchedulerConfig
from ..models.configs import SD15, ModelConfig
from ..models.text_encoder import TextEncoderConfig
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from .files import atomic_write, atomic_write_text

StateDict = dict[str, Tensor]
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


class WeightsError(ValueError):
    """A weights file or folder that minisd cannot use; the message says which and why."""


# ─── reading one file ────────────────────────────────────────────────────────────────────────────────

class _Inert:
    """Stands in for the training-time objects (PyTorch Lightning callbacks) that `.ckpt` files pickle
    beside the weights: it takes their state and runs nothing."""

    def __setstate__(self, state):
        self.state = state


# Globals that real SD `.ckpt` files contain besides tensors, mapped to inert stand-ins or to the
# harmless numpy constructors (allow-listing beats scanning; FORMATS.md §6).
def _safe_globals() -> list:
    import codecs

    import numpy as np

    stubs = [(_Inert, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
             (_Inert, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
             (codecs.encode, "_codecs.encode"), (set, "__builtin__.set"), np.dtype]
    try:  # numpy 2 moved numpy.core to numpy._core; pickles carry either name
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    stubs += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    stubs += [type(np.dtype(t)) for t in ("float32", "float64", "int64")]
    return stubs


def read_state_dict(path: str | os.PathLike, keep_all: bool = False) -> StateDict:
    """All tensors of one weights file, on the CPU, in the file's dtypes. keep_all: a pickle's other
    entries too (nested dicts, names: A1111 embeddings), as torch.load(weights_only=True) gives them.

    Raises FileNotFoundError for a missing file and WeightsError for a truncated, corrupt or unsafe one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers / short files
            raise WeightsError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    if path.suffix not in PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors or "
                           f"{', '.join(PICKLE_SUFFIXES)}")
    if path.read_bytes()[:40].startswith(b"version https://git-lfs"):
        raise WeightsError(f"{path} is a git-lfs pointer, not the weights: run `git lfs pull`")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=None)
    except Exception as e:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise WeightsError(f"{path} is a pickle that would import {', '.join(unsafe)}; minisd loads pickles "
                               f"with weights_only=True and refuses them. If you trust the file, convert it to "
                               f".safetensors yourself; nothing in it was run.") from e
        raise WeightsError(f"{path} could not be read as a PyTorch checkpoint (truncated or corrupt?): {e}") from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning: {"state_dict": {...}}
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return dict(obj) if keep_all else {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _unsafe_globals(path: Path) -> list[str]:
    allowed = {name for g in _safe_globals() if isinstance(g, tuple) for name in [g[1]]}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return []
    return [g for g in found if g not in allowed and not g.startswith("numpy.")]


def write_safetensors(state_dict: StateDict, path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Write atomically: after a crash or a full disk, `path` holds the old file or the new one, never a part."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_json(obj, path: str | os.PathLike) -> None:
    """A config file, indented as diffusers writes them, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2))


def read_json(path: Path, what: str = "config") -> dict:
    """A JSON object from `path`, or one WeightsError line naming the file and what is wrong with it."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise WeightsError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: {what} must be a JSON object {{...}}, got {type(obj).__name__}")
    return obj


def read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) from a safetensors header alone (the first 8 + n bytes), so a file's
    dtypes and shapes can be checked before gigabytes of tensors are read."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= 100_000_000:
            raise WeightsError(f"{path} is not a readable safetensors file (truncated or corrupt?): header size {n}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        return {k: (v["dtype"], list(v["shape"])) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file (truncated or corrupt?): bad header") from e


def read_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


# ─── strict loading into a module ──────────────────────────────────────────────────────────────────

def _few(names: Iterable[str], n: int = 5) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_strict(module: nn.Module, state_dict: StateDict, source: str, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """Fill every parameter of `module` (built on the meta device, or not) from `state_dict`, using
    every tensor; otherwise raise WeightsError naming `source`, the missing and unexpected keys and
    the shape mismatches."""
    expected = module.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{source} does not match the {type(module).__name__} it should fill:"]
        if missing:
            parts.append(f"  missing {len(missing)} keys: {_few(missing)}")
        if unexpected:
            parts.append(f"  unexpected {len(unexpected)} keys: {_few(unexpected)}")
        if shapes:
            parts.append(f"  {len(shapes)} shape mismatches: {'; '.join(shapes[:5])}")
        raise WeightsError("\n".join(parts))
    check_values(state_dict, expected, source)
    dtype = dtype or next(iter(state_dict.values())).dtype
    state_dict = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                  for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module.to(device)


def check_values(state_dict: StateDict, expected: StateDict, source: str) -> None:
    """Every floating-point parameter comes as floats (an integer tensor would be cast silently) and
    every value is finite (one NaN in a weight turns every picture into NaN, i.e. black)."""
    for k, v in state_dict.items():
        if expected[k].is_floating_point() and not v.is_floating_point():
            raise WeightsError(f"{source}: tensor {k} has dtype {v.dtype}; expected a floating-point dtype")
    for k, v in state_dict.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            n = int((~torch.isfinite(v)).sum())
            raise WeightsError(f"{source}: tensor {k} has {n} non-finite values (NaN or inf) of {v.numel()}")


# ─── diffusers-layout key spellings ────────────────────────────────────────────────────────────────

_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def fix_vae_keys(sd: StateDict) -> StateDict:
    """The SD 1.5 Hub VAE spells its mid-block attention `query/key/value/proj_attn` (diffusers 0.6);
    today's name is `to_q/to_k/to_v/to_out.0`. Some files also keep LDM's 1×1-conv shape [C,C,1,1]."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"(.*attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$", k)
        if m:
            k = m.group(1) + _LEGACY_VAE_ATTENTION[m.group(2)] + "." + m.group(3)
        if re.search(r"attentions\.\d+\.to_(q|k|v|out\.0)\.weight$", k) and v.ndim == 4:
            v = v[:, :, 0, 0]  # 1×1 conv -> linear
        out[k] = v
    return out


def fix_text_encoder_keys(sd: StateDict) -> StateDict:
    """transformers ≥ 5.6 saves CLIPTextModel without the `text_model.` prefix, older versions with it;
    `position_ids` is a buffer some files carry (sometimes as corrupted floats): minisd computes it."""
    out = {}
    for k, v in sd.items():
        if k.endswith("embeddings.position_ids"):
            continue
        out[k if k.startswith("text_model.") else "text_model." + k] = v
    return out


# ─── the single-file (LDM) layout ──────────────────────────────────────────────────────────────────

_RESNET_LDM = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET_LDM = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN_LDM = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def unet_prefix_table(cfg: UNetConfig) -> list[tuple[str, str, dict]]:
    """(LDM module, diffusers module, inner renames) for every U-Net module: the whole converter.

    LDM numbers its blocks flat: input_blocks.0 is conv_in, then per level `layers_per_block`
    [resnet, attention] pairs and a downsampler; output_blocks has `layers_per_block + 1` per level.
    """
    L, n = cfg.layers_per_block, len(cfg.block_out_channels)
    table = [("time_embed.0", "time_embedding.linear_1", {}), ("time_embed.2", "time_embedding.linear_2", {}),
             ("input_blocks.0.0", "conv_in", {}), ("out.0", "conv_norm_out", {}), ("out.2", "conv_out", {}),
             ("middle_block.0", "mid_block.resnets.0", _RESNET_LDM), ("middle_block.1", "mid_block.attentions.0", {}),
             ("middle_block.2", "mid_block.resnets.1", _RESNET_LDM)]
    for i in range(n):
        for j in range(L):
            b = (L + 1) * i + j + 1
            table.append((f"input_blocks.{b}.0", f"down_blocks.{i}.resnets.{j}", _RESNET_LDM))
            if cfg.cross_attention[i]:
                table.append((f"input_blocks.{b}.1", f"down_blocks.{i}.attentions.{j}", {}))
        if i < n - 1:
            table.append((f"input_blocks.{(L + 1) * (i + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv", {}))
    for i in range(n):  # up block i works at level n-1-i
        cross = cfg.cross_attention[n - 1 - i]
        for j in range(L + 1):
            b = (L + 1) * i + j
            table.append((f"output_blocks.{b}.0", f"up_blocks.{i}.resnets.{j}", _RESNET_LDM))
            if cross:
                table.append((f"output_blocks.{b}.1", f"up_blocks.{i}.attentions.{j}", {}))
        if i < n - 1:
            table.append((f"output_blocks.{(L + 1) * i + L}.{2 if cross else 1}.conv",
                          f"up_blocks.{i}.upsamplers.0.conv", {}))
    return table


def vae_prefix_table(cfg: VAEConfig) -> list[tuple[str, str, dict]]:
    """(LDM module, diffusers module, inner renames) for every VAE module. LDM's decoder numbers its
    levels from the bottom (up.3 runs first), diffusers' from the top."""
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    table = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_in", f"{part}.conv_in", {}), (f"{part}.conv_out", f"{part}.conv_out", {}),
                  (f"{part}.norm_out", f"{part}.conv_norm_out", {}),
                  (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET_LDM),
                  (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET_LDM),
                  (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTN_LDM)]
    for i in range(n):
        table += [(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET_LDM)
                  for j in range(L)]
        table += [(f"decoder.up.{n - 1 - i}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", _VAE_RESNET_LDM)
                  for j in range(L + 1)]
        if i < n - 1:
            table.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", {}))
            table.append((f"decoder.up.{n - 1 - i}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", {}))
    return table


def _rename(sd: StateDict, table: list[tuple[str, str, dict]], source: str, reverse: bool = False) -> StateDict:
    """Apply a prefix table (LDM -> diffusers, or back with `reverse`); every key must match a row."""
    rows = {(b if reverse else a): ((a if reverse else b), inner) for a, b, inner in table}
    out, unplaced = {}, []
    for key, value in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # longest module prefix first
            row = rows.get(".".join(parts[:cut]))
            if row is not None:
                break
        else:
            unplaced.append(key)
            continue
        target, inner = row
        rest = ".".join(parts[cut:])
        for old, new in inner.items():
            src, dst = (new, old) if reverse else (old, new)
            if rest == src or rest.startswith(src + "."):
                rest = dst + rest[len(src):]
                break
        out[f"{target}.{rest}"] = value
    if unplaced:
        raise WeightsError(f"{source}: {len(unplaced)} keys have no place in the model: {_few(unplaced)}")
    return out


def _conv_attention_to_linear(sd: StateDict) -> StateDict:
    """LDM's VAE attention is 1×1 convs, [C, C, 1, 1]; diffusers' (and minisd's) is Linear, [C, C]."""
    return {k: (v[:, :, 0, 0] if re.search(r"mid_block\.attentions\.0\.to_(q|k|v|out\.0)\.weight$", k)
                and v.ndim == 4 else v) for k, v in sd.items()}


# Keys that LDM files carry and no model needs: the training noise schedule, EMA bookkeeping,
# the learned-logvar scalar, and the VAE's discriminator/LPIPS loss.
_IGNORED = re.compile(r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
                      r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|"
                      r"posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|"
                      r"logvar|model_ema\.decay|model_ema\.num_updates|first_stage_model\.loss\..*|.*position_ids)$")

UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


def detect_model_type(sd: StateDict, source: str) -> str:
    """'sd1', 'sd1-inpainting', or a WeightsError saying what else the file is."""
    if any(k.startswith("conditioner.embedders.") for k in sd):
        raise WeightsError(f"{source} is an SDXL checkpoint; minisd supports Stable Diffusion 1.x (and 2.x "
                           f"diffusers folders), not SDXL")
    if any(k.startswith(("control_model.", "controlnet_cond_embedding.")) for k in sd):
        raise WeightsError(f"{source} is a ControlNet, not a full model: load it with pipe.load_controlnet()")
    if any(k.startswith(("lora_unet_", "lora_te_")) or ".lora_" in k for k in list(sd)[:50]):
        raise WeightsError(f"{source} is a LoRA, not a full model: load it with pipe.load_lora()")
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        raise WeightsError(f"{source} is an SD 2.x single file (OpenCLIP text encoder); minisd reads SD 2.x from "
                           f"diffusers folders only (e.g. stabilityai/stable-diffusion-2-1)")
    if f"{UNET_PREFIX}input_blocks.0.0.weight" not in sd:
        raise WeightsError(f"{source} has no U-Net ({UNET_PREFIX}* keys): not a Stable Diffusion checkpoint "
                           f"(first keys: {_few(list(sd)[:5])})")
    for prefix, what in ((VAE_PREFIX, "VAE"), (CLIP_PREFIX, "text encoder")):
        if not any(k.startswith(prefix) for k in sd):
            raise WeightsError(f"{source} has no {what} ({prefix}* keys); minisd needs a full checkpoint")
    conv_in = sd[f"{UNET_PREFIX}input_blocks.0.0.weight"]
    if conv_in.ndim != 4:
        raise WeightsError(f"{source}: {UNET_PREFIX}input_blocks.0.0.weight has shape {tuple(conv_in.shape)}; "
                           f"expected a 4-d conv weight")
    return "sd1-inpainting" if conv_in.shape[1] == 9 else "sd1"


def _infer_unet_config(sd: StateDict, base: UNetConfig) -> UNetConfig:
    """Read the U-Net's shape off its LDM tensors; what shapes cannot say (heads) comes from `base`."""
    inputs = {int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")}
    n = 1 + len({k.split(".")[1] for k in sd if re.match(r"input_blocks\.\d+\.0\.op\.", k)})
    L = len(inputs) // n - 1
    first = [(L + 1) * i + 1 for i in range(n)]
    chs = tuple(sd[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0] for b in first)
    cross = tuple(f"input_blocks.{b}.1.proj_in.weight" in sd for b in first)
    attn = next(k for k in sd if k.endswith("attn2.to_k.weight"))
    heads = base.num_heads if len(base.num_heads) == n else (base.num_heads[0],) * n
    return UNetConfig(
        in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=sd["out.2.weight"].shape[0],
        block_out_channels=chs, cross_attention=cross, layers_per_block=L, num_heads=heads,
        cross_attention_dim=sd[attn].shape[1], norm_num_groups=base.norm_num_groups,
        use_linear_projection=sd[attn.replace("transformer_blocks.0.attn2.to_k", "proj_in")].ndim == 2,
        sample_size=base.sample_size, prediction_type=base.prediction_type)


def _infer_vae_config(sd: StateDict, base: VAEConfig) -> VAEConfig:
    n = 1 + len({k.split(".")[2] for k in sd if re.match(r"encoder\.down\.\d+\.downsample\.", k)})
    chs = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(n))
    L = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    return VAEConfig(in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
                     latent_channels=sd["post_quant_conv.weight"].shape[0], block_out_channels=chs,
                     layers_per_block=L, norm_num_groups=base.norm_num_groups, scaling_factor=base.scaling_factor,
                     sample_size=base.sample_size, force_upcast=base.force_upcast)


def _infer_text_config(sd: StateDict, base: TextEncoderConfig) -> TextEncoderConfig:
    vocab, E = sd["text_model.embeddings.token_embedding.weight"].shape
    layers = len({k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")})
    return TextEncoderConfig(vocab_size=vocab, hidden_size=E, num_hidden_layers=layers,
                             intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                             num_attention_heads=base.num_attention_heads if E % base.num_attention_heads == 0 and
                             base.hidden_size == E else max(E // 64, 1),
                             max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
                             hidden_act=base.hidden_act, eos_token_id=base.eos_token_id,
                             projection_dim=base.projection_dim)


@dataclass
class Components:
    """Configs and state dicts (minisd names) of the three networks, plus the schedule."""

    unet: tuple[UNetConfig, StateDict]
    vae: tuple[VAEConfig, StateDict]
    text_encoder: tuple[TextEncoderConfig, StateDict]
    scheduler: SchedulerConfig
    tokenizer_folder: Path | None = None
    sources: dict[str, str] | None = None  # component -> the file its weights came from (for errors)


def convert_single_file(sd: StateDict, source: str, metadata: dict[str, str] | None = None) -> Components:
    """An LDM single-file state dict -> minisd components (configs read off the shapes)."""

    detect_model_type(sd, source)
    base = SD15
    if metadata and "minisd_config" in metadata:  # written by minisd.save_single_file

        try:
            base = ModelConfig.from_json(metadata["minisd_config"])
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise WeightsError(f"{source}: bad minisd_config metadata ({type(e).__name__}: {e})") from e
    unet_keys = [k for k in sd if k.startswith(UNET_PREFIX)]
    ema = {k: "model_ema." + k[len("model."):].replace(".", "") for k in unet_keys}
    use_ema = sum(k.startswith("model_ema.") for k in sd) > 100 and all(e in sd for e in ema.values())
    unet_sd, vae_sd, text_sd, unplaced = {}, {}, {}, []
    for k, v in sd.items():
        if k.startswith(UNET_PREFIX):
            unet_sd[k[len(UNET_PREFIX):]] = sd[ema[k]] if use_ema else v  # EMA weights are the ones to sample with
        elif k.startswith(VAE_PREFIX) and not _IGNORED.match(k):
            vae_sd[k[len(VAE_PREFIX):]] = v
        elif k.startswith(CLIP_PREFIX):
            text_sd[k[len(CLIP_PREFIX):]] = v
        elif not (_IGNORED.match(k) or k.startswith("model_ema.")):
            unplaced.append(k)
    if unplaced:
        raise WeightsError(f"{source}: {len(unplaced)} keys belong to no component: {_few(unplaced)}")
    text_sd = fix_text_encoder_keys(text_sd)
    try:  # the shapes of a damaged file can be missing, of the wrong rank, or absurd
        unet_cfg = _infer_unet_config(unet_sd, base.unet)
        vae_cfg = _infer_vae_config(vae_sd, base.vae)
        text_cfg = _infer_text_config(text_sd, base.text_encoder)
    except (KeyError, IndexError, StopIteration, ZeroDivisionError) as e:
        raise WeightsError(f"{source}: cannot read the model's shape off its tensors "
                           f"({type(e).__name__}: {e}); not a complete SD 1.x checkpoint?") from e
    except ValueError as e:
        raise WeightsError(f"{source}: {e}") from e
    return Components(
        unet=(unet_cfg, _rename(unet_sd, unet_prefix_table(unet_cfg), source)),
        vae=(vae_cfg, _conv_attention_to_linear(_rename(vae_sd, vae_prefix_table(vae_cfg), source))),
        text_encoder=(text_cfg, text_sd), scheduler=base.scheduler)


def to_single_file(unet: tuple[UNetConfig, StateDict], vae: tuple[VAEConfig, StateDict],
                   text: StateDict) -> StateDict:
    """minisd components -> one LDM-layout state dict (the reverse of `convert_single_file`)."""
    (ucfg, usd), (vcfg, vsd) = unet, vae
    out = {UNET_PREFIX + k: v for k, v in _rename(usd, unet_prefix_table(ucfg), "unet", reverse=True).items()}
    for k, v in _rename(vsd, vae_prefix_table(vcfg), "vae", reverse=True).items():
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", k):
            v = v[:, :, None, None]  # Linear -> LDM's 1×1 conv
        out[VAE_PREFIX + k] = v
    out.update({CLIP_PREFIX + k: v for k, v in text.items()})
    return out


# ─── diffusers folders ─────────────────────────────────────────────────────────────────────────────

WEIGHT_STEMS = {"unet": ("diffusion_pytorch_model",), "transformer": ("diffusion_pytorch_model",),
                "vae": ("diffusion_pytorch_model",), "text_encoder": ("model", "pytorch_model")}


def find_weights(folder: Path, stems: tuple[str, ...], variant: str | None) -> list[Path]:
    """The weight file(s) of one component: safetensors before pickles, `{stem}.{variant}.{ext}` when a
    variant is asked for, sharded files through their index."""
    names = []
    for ext in (".safetensors", ".bin"):
        for stem in stems:
            full = f"{stem}.{variant}{ext}" if variant else f"{stem}{ext}"
            names.append(full)
            if (folder / full).is_file():
                return [folder / full]
            index = folder / f"{full}.index.json"
            if index.is_file():
                return read_shard_index(index)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise WeightsError(f"{folder}: no weights file {' / '.join(names)}"
                       + (f" for variant {variant!r}" if variant else "") + f"; the folder holds {present}")


def read_shard_index(index: Path) -> list[Path]:
    """The shard files of a `*.index.json`: its `weight_map` (tensor name -> file name), each file
    inside the index's folder (no absolute paths, no `..`, no symlink out of it) and present."""
    weight_map = read_json(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index}: shard index needs a non-empty \"weight_map\" object (tensor name -> file name)")
    folder = index.parent
    shards = []
    for name in sorted(set(weight_map.values()), key=str):
        if not isinstance(name, str) or not name:
            raise WeightsError(f"{index}: weight_map value {name!r} is not a file name")
        shard = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not _inside(shard, folder):
            raise WeightsError(f"{index}: shard {name!r} is outside the folder {folder}")
        if not shard.is_file():
            raise WeightsError(f"{index}: shard {name!r} is missing from {folder}")
        shards.append(shard)
    return shards


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path`, symlinks followed, lies inside `folder`. In a Hugging Face cache snapshot
    (`.../snapshots/<revision>/...`) every file is a symlink to the repo's `blobs/`: those count too."""
    target, root = path.resolve(), folder.resolve()
    if target.is_relative_to(root):
        return True
    snapshot = next((a for a in folder.absolute().parents if a.parent.name == "snapshots"), None)
    return snapshot is not None and target.is_relative_to((snapshot.parent.parent / "blobs").resolve())


def read_component(folder: Path, name: str, variant: str | None, parse, *args) -> tuple[object, StateDict, str]:
    """One network of a diffusers folder: `parse(config dict, *args)`, checked before any weight is read,
    then its state dict and the file it came from."""
    sub = folder / name
    if not sub.is_dir():
        raise WeightsError(f"{folder} has no {name}/ folder; a Stable Diffusion diffusers folder needs "
                           f"unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
    config_path = sub / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{sub} has no config.json")
    config = _parse_config(config_path, parse, read_json(config_path), *args)
    files = find_weights(sub, WEIGHT_STEMS[name.removesuffix("_2")], variant)  # text_encoder_2: SDXL
    if all(f.suffix == ".safetensors" for f in files):  # cheap: headers only, before any data is read
        header = {k: v for f in files for k, v in read_safetensors_header(f).items()}
        _check_header(header, config, config_path, files[0])
    sd: StateDict = {}
    for f in files:
        sd.update(read_state_dict(f))
    return config, sd, str(files[0])


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _check_header(header: dict[str, tuple[str, list[int]]], cfg, config_path: Path, source: Path) -> None:
    """From the safetensors headers, before any data is read: refuse integer tensors, and a config.json
    whose levels or layers contradict the file (one line instead of hundreds of missing keys).
    Tensor shapes are compared by `load_strict`, which lists every mismatch."""
    for k, (dtype, _) in header.items():
        if dtype not in _FLOAT_DTYPES and not k.endswith("position_ids"):  # position_ids: int ids, dropped
            raise WeightsError(f"{source}: tensor {k} has dtype {dtype}; expected a floating-point dtype")
    keys = [k.removeprefix("text_model.") for k in header]

    def count(pattern: str) -> int:
        return len({m.group(1) for k in keys for m in [re.match(pattern, k)] if m})

    if isinstance(cfg, TextEncoderConfig):
        facts = [("num_hidden_layers", cfg.num_hidden_layers, "layers", count(r"encoder\.layers\.(\d+)\."))]
    else:
        part = "encoder." if isinstance(cfg, VAEConfig) else ""
        facts = [("block_out_channels", len(cfg.block_out_channels), "levels", count(rf"{part}down_blocks\.(\d+)\.")),
                 ("layers_per_block", cfg.layers_per_block, "resnets per level",
                  count(rf"{part}down_blocks\.0\.resnets\.(\d+)\."))]
    for field, want, what, have in facts:
        if have and have != want:
            raise WeightsError(f"{config_path} says {field} = {getattr(cfg, field)} but {source} has "
                               f"{have} {what} (expected {want})")


def read_diffusers_folder(folder: Path, variant: str | None = None) -> Components:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        lora = " — it holds a LoRA: attach it to a model with load_lora (--lora)" \
            if (folder / "pytorch_lora_weights.safetensors").is_file() else ""
        raise WeightsError(f"{folder} is not a diffusers pipeline folder (no model_index.json){lora}")
    index = read_json(index_path, "model_index.json")
    if "StableDiffusionXL" in str(index.get("_class_name", "")) or "text_encoder_2" in index:
        raise WeightsError(f"{folder} is an SDXL pipeline; minisd supports Stable Diffusion 1.x and 2.x")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = _parse_config(sched_path, SchedulerConfig.from_diffusers,
                              read_json(sched_path) if sched_path.is_file() else {})
    unet_cfg, usd, usrc = read_component(folder, "unet", variant, _sd_unet_config, scheduler.prediction_type)
    vae_cfg, vsd, vsrc = read_component(folder, "vae", variant, VAEConfig.from_diffusers)
    text_cfg, tsd, tsrc = read_component(folder, "text_encoder", variant, TextEncoderConfig.from_transformers)
    tok = folder / "tokenizer"
    return Components(unet=(unet_cfg, usd), vae=(vae_cfg, fix_vae_keys(vsd)),
                      text_encoder=(text_cfg, fix_text_encoder_keys(tsd)), scheduler=scheduler,
                      tokenizer_folder=tok if tok.is_dir() else None,
                      sources={"unet": usrc, "vae": vsrc, "text_encoder": tsrc})


def _sd_unet_config(cfg: dict, prediction_type: str) -> UNetConfig:
    """UNetConfig.from_diffusers without SDXL's generalisations, which an SD 1.x/2.x pipeline cannot feed
    (no pooled text or size ids); SDXL folders are read by minisd.formats.sdxl.read_sdxl_folder."""
    if cfg.get("addition_embed_type") is not None:
        raise ValueError(f"unsupported U-Net config addition_embed_type={cfg['addition_embed_type']!r} (an SDXL "
                         f"U-Net: read it with minisd.formats.sdxl.read_sdxl_folder)")
    if cfg.get("transformer_layers_per_block", 1) != 1:
        raise ValueError(f"transformer_layers_per_block={cfg['transformer_layers_per_block']} is not supported "
                         f"by the SD 1.x/2.x pipeline (SDXL: minisd.formats.sdxl.read_sdxl_folder)")
    return UNetConfig.from_diffusers(cfg, prediction_type)


def _parse_config(path: Path, parse, *args):
    """A config class from its JSON dict; any bad field is one WeightsError line naming the file."""
    try:
        return parse(*args)
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from e
    except (TypeError, KeyError, AttributeError) as e:  # a field of the wrong JSON type
        raise WeightsError(f"{path}: a field has the wrong type ({type(e).__name__}: {e})") from e


def write_diffusers_folder(folder: Path, unet: tuple[UNetConfig, StateDict], vae: tuple[VAEConfig, StateDict],
                           text: tuple[TextEncoderConfig, StateDict], scheduler: SchedulerConfig,
                           scheduler_class: str | None = None) -> None:
    """The diffusers layout, readable by diffusers' `StableDiffusionPipeline.from_pretrained` too.
    (The tokenizer folder is written by the caller.) The scheduler class: the config's own by default."""
    folder.mkdir(parents=True, exist_ok=True)
    scheduler_class = scheduler.diffusers_class() if scheduler_class is None else scheduler_class
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", scheduler_class], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    for name, config, sd, fname in (("unet", unet[0].to_diffusers(), unet[1], "diffusion_pytorch_model"),
                                    ("vae", vae[0].to_diffusers(), vae[1], "diffusion_pytorch_model"),
                                    ("text_encoder", text[0].to_transformers(), text[1], "model")):
        write_safetensors(sd, folder / name / f"{fname}.safetensors", metadata={"format": "pt"})
        write_json(config, folder / name / "config.json")
    write_json(scheduler.to_diffusers(scheduler_class), folder / "scheduler" / "scheduler_config.json")
    write_json(index, folder / "model_index.json")  # last: a folder without it is visibly unfinished


# ─── the Hub ────────────────────────────────────────────────────────────────────────────────────────

def looks_like_repo_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not source.startswith((".", "/")) and \
        Path(source).suffix not in (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


def download(repo_id: str, variant: str | None = None) -> Path:
    """Fetch the files a pipeline needs (configs, tokenizer, one weights file per network,
    safetensors first) into the Hugging Face cache; offline, use what is cached or say how to get it."""
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = set(list_repo_files(repo_id))
    except Exception as online_error:
        try:
            return Path(snapshot_download(repo_id, local_files_only=True))
        except Exception:
            raise WeightsError(
                f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(online_error).__name__}: "
                f"{online_error}) and it is not in the local cache.\nOn a machine with internet, run\n"
                f"    huggingface-cli download {repo_id} --exclude '*.ckpt' '*.bin' 'safety_checker/*'\n"
                f"and copy the Hugging Face cache (~/.cache/huggingface) here, or download the folder and "
                f"pass its path: StableDiffusion.from_pretrained('path/to/folder').") from online_error
    return Path(snapshot_download(repo_id, allow_patterns=wanted_files(repo_id, files, variant)))


NETWORKS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
PIPELINE_PARTS = (*NETWORKS, "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")


def wanted_files(repo_id: str, files: set[str], variant: str | None = None) -> list[str]:
    """What `download` fetches from a repo's `files`: model_index.json, every pipeline folder's configs and
    tokenizer files, and one set of weights per network it holds (SD 1.x: unet, vae, text_encoder; SDXL adds
    text_encoder_2; SD 3: transformer and up to three text encoders) — safetensors first, a variant's when
    asked, every shard of a sharded one (T5-XXL's). Glob patterns for snapshot_download."""
    folders = {f.split("/")[0] for f in files if "/" in f}
    wanted = [f for f in files if f == "model_index.json" or (
        f.split("/")[0] in PIPELINE_PARTS and f.endswith((".json", ".txt", ".model")))]
    for component in (n for n in NETWORKS if n in folders):
        stems = WEIGHT_STEMS[component.removesuffix("_2").removesuffix("_3")]
        tag = f".{variant}" if variant else ""
        for ext in (".safetensors", ".bin"):
            single = [f"{component}/{s}{tag}{ext}" for s in stems if f"{component}/{s}{tag}{ext}" in files]
            sharded = [s for s in stems if {f"{component}/{s}{tag}{ext}.index.json",  # transformers' and diffusers' names
                                            f"{component}/{s}{ext}.index{tag}.json"} & files]
            if single or sharded:
                wanted += single[:1] if single else [f"{component}/{sharded[0]}{tag}-*-of-*{ext}"]
                break
        else:
            raise WeightsError(f"{repo_id} has no {component} weights" + (f" for variant {variant!r}" if variant else ""))
    return wanted

