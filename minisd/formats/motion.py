"""Reading and writing AnimateDiff motion adapters.

Two layouts:

* diffusers' `MotionAdapter` folder (config.json + diffusion_pytorch_model.safetensors/.bin), or one file in its
  names: these are minisd's names, no key map;
* AnimateDiff's own `.ckpt`/`.safetensors` (guoyww/AnimateDiff, `mm_sd_v15_v2.ckpt`), whose motion modules wrap
  the same layers in `temporal_transformer.` and name them after its `TemporalTransformerBlock`:

      down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight
      down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight              (diffusers, minisd)

  `convert_original` renames them by the rules in `_ORIGINAL_RULES`, the same as diffusers'
  `convert_animatediff_checkpoint_to_diffusers`, and keeps the position table that diffusers drops.

Pickles are read by `read_state_dict` (torch.load with weights_only=True) only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..models.motion import ANIMATEDIFF_SD15_V2, MotionAdapter, MotionAdapterConfig, sinusoidal_positions
from . import weights
from .weights import StateDict, WeightsError

# AnimateDiff name -> diffusers name, applied in order to the part after `motion_modules.N.`
_ORIGINAL_RULES = [
    ("temporal_transformer.", ""),           # AnimateDiff's VanillaTemporalModule wraps the transformer
    (".attention_blocks.0.", ".attn1."),     # attention_block_types ("Temporal_Self", "Temporal_Self")
    (".attention_blocks.1.", ".attn2."),
    (".norms.0.", ".norm1."),                # one LayerNorm before each attention ...
    (".norms.1.", ".norm2."),
    (".ff_norm.", ".norm3."),                # ... and one before the MLP
]
_ORIGINAL_KEY = re.compile(r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.motion_modules\.\d+\.temporal_transformer\.")
_POSITIONS = re.compile(r"^(.*\.transformer_blocks\.\d+)\.attention_blocks\.([01])\.pos_encoder\.pe$")

# beside the adapter in a folder `minisd train motion` wrote (read by `StableDiffusion.load_motion_module`):
WORDS_FILE = "direction_words.safetensors"  # {word: (E,)} new tokens of the text encoder, trained with the module
LORA_FILE = "spatial_lora.safetensors"      # a PEFT LoRA on the image U-Net's cross-attention, trained with it


def is_original(sd: StateDict) -> bool:
    """AnimateDiff's own layout (`...motion_modules.N.temporal_transformer....`)?"""
    return any(".temporal_transformer." in k for k in sd)


def convert_original(sd: StateDict, source: str) -> StateDict:
    """AnimateDiff's names -> diffusers' (= minisd's). Every key is used or raises WeightsError.

    Positions: AnimateDiff gives each of a block's two attentions its own copy of the same sinusoid table
    (`attention_blocks.{0,1}.pos_encoder.pe`); diffusers keeps one per block (`pos_embed.pe`), added before both.
    The first becomes it, the second must equal it.
    """
    out: StateDict = {}
    unknown = [k for k in sd if not _ORIGINAL_KEY.match(k)]
    if unknown:
        raise WeightsError(f"{source}: {len(unknown)} keys outside AnimateDiff's motion modules, e.g. "
                           f"{', '.join(sorted(unknown)[:3])}")
    for k, v in sd.items():
        positions = _POSITIONS.match(k)
        if positions:
            block, i = positions.groups()
            if i == "1":  # the second copy: checked, then dropped
                first = sd.get(f"{block}.attention_blocks.0.pos_encoder.pe")
                if first is None or first.shape != v.shape or not torch.equal(first, v):
                    raise WeightsError(f"{source}: {k} differs from (or has no) attention_blocks.0's position table")
                continue
            k = f"{block}.pos_embed.pe"
        for old, new in _ORIGINAL_RULES:
            k = k.replace(old, new)
        out[k] = v
    return out


def infer_config(sd: StateDict, base: MotionAdapterConfig = ANIMATEDIFF_SD15_V2) -> MotionAdapterConfig:
    """The config of a diffusers-named state dict, read from its keys and shapes. Heads and GroupNorm groups
    leave no trace in the weights: they come from `base` (8 and 32 in AnimateDiff's SD 1.5 releases)."""
    def count(pattern: str) -> int:
        return len({m.group(1) for k in sd for m in [re.match(pattern, k)] if m})

    levels = count(r"down_blocks\.(\d+)\.")
    if not levels:
        raise WeightsError("not a motion adapter: no down_blocks.N.motion_modules keys")
    chs = tuple(sd[f"down_blocks.{i}.motion_modules.0.proj_in.weight"].shape[1] for i in range(levels))
    depths = tuple(count(rf"down_blocks\.{i}\.motion_modules\.0\.transformer_blocks\.(\d+)\.") for i in range(levels))
    pe = sd.get("down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe")
    mid = any(k.startswith("mid_block.") for k in sd)
    return MotionAdapterConfig(
        block_out_channels=chs, layers_per_block=count(r"down_blocks\.0\.motion_modules\.(\d+)\."),
        transformer_depth=depths[0] if len(set(depths)) == 1 else depths,
        num_heads=base.num_heads if len(base.num_heads) == levels else (base.num_heads[0],) * levels,
        norm_num_groups=base.norm_num_groups,
        max_seq_length=pe.shape[1] if pe is not None else base.max_seq_length, mid_block=mid,
        mid_transformer_depth=count(r"mid_block\.motion_modules\.0\.transformer_blocks\.(\d+)\.") if mid else 1)


def read_motion_adapter(source: str | os.PathLike, base: MotionAdapterConfig = ANIMATEDIFF_SD15_V2
                        ) -> tuple[MotionAdapterConfig, StateDict, str]:
    """(config, diffusers-named state dict, file) from a diffusers MotionAdapter folder (its config.json), or from
    one file in diffusers' or AnimateDiff's layout (its config read from the weights, heads and groups from `base`)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"motion adapter {str(source)!r}: no such file or folder")
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise WeightsError(f"{path}: no config.json; is this a diffusers MotionAdapter folder?")
        config = weights.read_json(config_path)
        cfg = weights._parse_config(config_path, MotionAdapterConfig.from_diffusers, config)
        files = weights.find_weights(path, ("diffusion_pytorch_model",), None)
        sd: StateDict = {}
        for f in files:
            sd.update(weights.read_state_dict(f))
        return cfg, sd, str(files[0])
    sd = weights.read_state_dict(path)
    if is_original(sd):
        sd = convert_original(sd, str(path))
    return infer_config(sd, base), sd, str(path)


def fill_positions(sd: StateDict, adapter: MotionAdapter) -> StateDict:
    """The position tables, when a file has none at all (diffusers' own converter drops them): they are
    the fixed sinusoid of `sinusoidal_positions`, not learned weights. A file with some but not all is an error
    (`load_strict` names the missing ones)."""
    expected = [k for k in adapter.state_dict() if k.endswith(".pos_embed.pe")]
    if any(k in sd for k in expected):
        return sd
    shapes = adapter.state_dict()
    return sd | {k: sinusoidal_positions(shapes[k].shape[1], shapes[k].shape[2]) for k in expected}

def load_motion_adapter(source: str | os.PathLike, device=None, dtype: torch.dtype | None = None,
                        base: MotionAdapterConfig = ANIMATEDIFF_SD15_V2) -> MotionAdapter:
    """A `MotionAdapter` from a diffusers folder or a diffusers-/AnimateDiff-layout file, loaded strictly:
    every tensor of the file used, every parameter filled (the position tables may be absent; see `fill_positions`).
    `base`: the heads and GroupNorm groups of a single file, which its weights do not record (`infer_config`)."""
    cfg, sd, name = read_motion_adapter(source, base)
    with torch.device("meta"):
        adapter = MotionAdapter(cfg)
    weights.load_strict(adapter, fill_positions(sd, adapter), name, dtype, device or "cpu")
    return adapter.eval()


def save_motion_adapter(adapter: MotionAdapter, folder: str | os.PathLike) -> None:
    """A diffusers MotionAdapter folder (config.json + diffusion_pytorch_model.safetensors), which diffusers'
    `MotionAdapter.from_pretrained` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights.write_json(adapter.config.to_diffusers(), folder / "config.json")
    weights.write_safetensors(adapter.state_dict(), folder / "diffusion_pytorch_model.safetensors")


__all__ = ["convert_original", "infer_config", "is_original", "load_motion_adapter", "read_motion_adapter",
           "save_motion_adapter"]
