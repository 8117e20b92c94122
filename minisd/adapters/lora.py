"""LoRA: low-rank adaptation of frozen layers (Hu et al. 2021), and the LoRA files people share.

A frozen weight W (out × in) gets a trainable low-rank update:

    W' = W + (α/r) · B A         A: r × in ("down", lora_A)   B: out × r ("up", lora_B)   r ≪ in, out
    y  = W x + (α/r) · B (A x)   — the same thing, computed without ever forming B A

B starts at zero, so a fresh LoRA changes nothing; A starts random, so gradients reach B at once.
For a convolution, A is a conv with W's kernel, stride and padding and B a 1×1 conv. α is a number
stored with the weights (kohya's `.alpha`, PEFT's `lora_alpha`); α = r means scale 1.

Here a LoRA is attached to a layer with a forward hook: the model's own modules and parameter names
stay untouched (checkpoints still save and load as before), several LoRAs can sit on one layer, each
with its own user scale, and `fuse` folds them into W for speed (`unfuse` restores W exactly).

Files in circulation, all read by `read_lora` into one form, {module path: (A, B, α)}:
    kohya       lora_unet_down_blocks_0_…_to_q.lora_down.weight / .lora_up.weight / .alpha
                lora_te_text_model_encoder_layers_0_self_attn_q_proj.…   (also LDM U-Net names)
    PEFT        unet.down_blocks.0.….to_q.lora_A.weight / .lora_B.weight, α in the
                `lora_adapter_metadata` JSON (`lora_alpha`, `alpha_pattern`); none: α = r
    old diffusers   unet.….to_q.lora.down.weight, ….processor.to_q_lora.down.weight,
                text_encoder.….q_proj.lora_linear_layer.down.weight                  (α = r)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..formats.weights import WeightsError, _few, _rename, read_metadata, read_state_dict, unet_prefix_table, write_safetensors

# Where LoRA training puts adapters by default: every attention projection of the U-Net.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRA(nn.Module):
    """ΔW = (α/r)·B A for one Linear or Conv2d layer; `forward(x)` = ΔW applied to x."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None):
        super().__init__()
        if isinstance(layer, nn.Linear):
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, layer.out_features, bias=False)
        elif isinstance(layer, nn.Conv2d):
            self.down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
            self.up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA adapts Linear and Conv2d layers, not {type(layer).__name__}")
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # as PEFT and kohya
        nn.init.zeros_(self.up.weight)                                # B = 0: ΔW = 0 at the start
        self.rank, self.alpha = rank, float(alpha if alpha else rank)  # kohya: α missing or 0 means α = r
        self.multiplier = 1.0   # the user's scale (load_lora(scale=…), set_lora_scale)
        self.fused = False      # folded into the layer's weight: the hook then skips it

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x)) * self.scale

    def delta_weight(self) -> Tensor:
        """(α/r)·B A, shaped like the layer's weight: (out, in) or (out, in, k, k)."""
        down, up = self.down.weight, self.up.weight
        delta = up.flatten(1) @ down.flatten(1)  # (out, r) @ (r, in·k·k)
        return (delta.view(up.shape[0], *down.shape[1:]) if down.ndim == 4 else delta) * self.scale


# ─── attaching LoRAs to a model ────────────────────────────────────────────────────────────────────

def _hook(layer: nn.Module, args: tuple, out: Tensor) -> Tensor:
    x = args[0]
    for lora in layer._minisd_loras.values():
        if lora.multiplier and not lora.fused:
            out = out + lora.multiplier * lora(x.to(lora.up.weight.dtype)).to(out.dtype)
    return out


def attach(layer: nn.Module, name: str, lora: LoRA) -> None:
    """Add `lora` to `layer` under `name`; the layer's output becomes W x + Σ multiplier · ΔW x."""
    if not hasattr(layer, "_minisd_loras"):
        layer._minisd_loras = {}  # a plain dict, not a submodule: the layer's state_dict is unchanged
        layer._minisd_lora_hook = layer.register_forward_hook(_hook)
    if name in layer._minisd_loras:
        raise ValueError(f"a LoRA named {name!r} is already attached to this layer")
    layer._minisd_loras[name] = lora.to(device=layer.weight.device)


def detach(layer: nn.Module, name: str) -> None:
    loras = getattr(layer, "_minisd_loras", {})
    lora = loras.pop(name, None)
    if lora is not None and lora.fused:
        raise RuntimeError("unfuse LoRAs before removing them")
    if not loras and hasattr(layer, "_minisd_lora_hook"):
        layer._minisd_lora_hook.remove()
        del layer._minisd_loras, layer._minisd_lora_hook


def inject(roots: dict[str, nn.Module], name: str, rank: int, alpha: float | None = None,
           targets: Iterable[str] = ATTENTION_TARGETS, root: str = "unet") -> dict[str, LoRA]:
    """Fresh LoRAs on every layer of `roots[root]` whose name ends with one of `targets`
    (e.g. "to_q", "to_out.0", "proj_in", "ff.net.2", "q_proj"): {module path: LoRA}, ready to train."""
    targets = tuple(targets)
    out = {}
    for path, layer in roots[root].named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and any(path == t or path.endswith("." + t) for t in targets):
            lora = LoRA(layer, rank, alpha).to(layer.weight.device)
            attach(layer, name, lora)
            out[f"{root}.{path}"] = lora
    if not out:
        raise ValueError(f"no Linear/Conv2d layer of {root} ends with any of {targets}")
    return out


def fuse(roots: dict[str, nn.Module], loras: dict[str, LoRA]) -> None:
    """W ← W + multiplier · ΔW for each LoRA (the original W is kept, so unfuse is exact)."""
    for path, lora in loras.items():
        if lora.fused:
            continue
        layer = _layer(roots, path)
        if not hasattr(layer, "_minisd_original_weight"):
            layer._minisd_original_weight = layer.weight.detach().clone()
        with torch.no_grad():
            layer.weight += (lora.multiplier * lora.delta_weight().float()).to(layer.weight.dtype)
        lora.fused = True


def unfuse(roots: dict[str, nn.Module], loras: dict[str, LoRA]) -> None:
    """Undo `fuse` for these LoRAs: W back to its original values, bit for bit when all are unfused."""
    layers = {}
    for path, lora in loras.items():
        if lora.fused:
            lora.fused = False
            layers[path] = _layer(roots, path)
    for layer in layers.values():
        with torch.no_grad():
            layer.weight.copy_(layer._minisd_original_weight)
            for other in layer._minisd_loras.values():  # LoRAs of other adapters stay folded in
                if other.fused:
                    layer.weight += (other.multiplier * other.delta_weight().float()).to(layer.weight.dtype)
        if not any(o.fused for o in layer._minisd_loras.values()):
            del layer._minisd_original_weight


def _layer(roots: dict[str, nn.Module], path: str) -> nn.Module:
    root, _, rest = path.partition(".")
    return roots[root].get_submodule(rest)


# ─── reading the files people have ─────────────────────────────────────────────────────────────────

# What LyCORIS and friends put in their files; none of it is a plain LoRA.
_UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoCon with CP decomposition (lora_mid)",
                ".diff": "a full weight difference", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
                ".a1.": "GLoRA", "on_input": "IA3"}

_OLD_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _parse_key(key: str) -> tuple[str, str, str] | None:
    """key -> (root, module path in the root, role: 'down' | 'up' | 'alpha'), names as the file spells them."""
    key = key.removeprefix("base_model.model.")
    if m := re.fullmatch(r"(lora_unet|lora_te[12]?)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", key):  # kohya
        return ("kohya_" + m[1], m[2], {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m[3]])
    root = "unet"
    for prefix in ("unet.", "text_encoder."):
        if key.startswith(prefix):
            root, key = prefix[:-1], key[len(prefix):]
    if m := re.fullmatch(r"(.+)\.lora_([AB])\.weight", key):  # PEFT
        return root, m[1], "down" if m[2] == "A" else "up"
    if m := re.fullmatch(r"(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight", key):  # diffusers after PEFT
        return root, m[1], m[2]
    if m := re.fullmatch(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight", key):  # attn procs
        proj = _OLD_ATTN[m[2]] if root == "text_encoder" else ("to_out.0" if m[2] == "to_out" else m[2])
        return root, f"{m[1]}.{proj}", m[3]
    if m := re.fullmatch(r"(.+)\.alpha", key):
        return root, m[1], "alpha"
    return None


def _kohya_names(roots: dict[str, nn.Module]) -> dict[str, str]:
    """kohya's flattened names ("." -> "_") -> our module paths, built from the model's own names
    (flattening is not invertible: `to_out_0`, `proj_in` and `ff_net_0_proj` all contain "_")."""
    names = {}
    unet = roots.get("unet")
    if unet is not None:
        paths = [p for p, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        for p in paths:
            names["lora_unet_" + p.replace(".", "_")] = "unet." + p
        if hasattr(unet, "config"):  # SD1 LoRAs made with LDM names: input_blocks_4_1_transformer_blocks_…
            ldm = _rename({p + ".weight": None for p in paths}, unet_prefix_table(unet.config), "U-Net", reverse=True)
            for key, p in zip(ldm, paths):
                names["lora_unet_" + key.removesuffix(".weight").replace(".", "_")] = "unet." + p
    te = roots.get("text_encoder")
    if te is not None:
        for p, m in te.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                names["lora_te_" + p.replace(".", "_")] = "text_encoder." + p
                names["lora_te_" + p.removeprefix("text_model.").replace(".", "_")] = "text_encoder." + p
    return names


def _peft_alpha(metadata: dict, root: str, path: str, rank: int) -> float:
    """α of one module from PEFT's adapter metadata ({"unet.lora_alpha": 8, "unet.alpha_pattern": {...}})."""
    cfg = {k.removeprefix(root + "."): v for k, v in metadata.items() if k.startswith(root + ".")}
    if not cfg:
        return float(rank)  # diffusers/PEFT convention with no metadata: α = r, scale 1
    alpha = cfg.get("lora_alpha", cfg.get("r", rank))
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", path):
            alpha = value
    if cfg.get("use_rslora"):
        return float(alpha) * rank / math.sqrt(rank)  # rsLoRA: scale α/√r, expressed as an α for α/r
    return float(alpha)


def read_lora(source: str | os.PathLike | dict, roots: dict[str, nn.Module]) -> dict[str, tuple[Tensor, Tensor, float]]:
    """A LoRA file or state dict -> {module path ("unet.…" / "text_encoder.…"): (A, B, α)}, every key
    placed on a real layer of `roots` with matching shapes, or a WeightsError naming what was not."""
    if isinstance(source, dict):
        sd, metadata, name = source, {}, "LoRA state dict"
    else:
        path = Path(source)
        if path.is_dir():
            files = [path / f for f in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin") if (path / f).is_file()]
            if not files:
                raise WeightsError(f"{path}: no pytorch_lora_weights.safetensors (or .bin) in this folder")
            path = files[0]
        sd, name = read_state_dict(path), str(path)
        metadata = read_metadata(path) if path.suffix == ".safetensors" else {}
    raw = metadata.get("lora_adapter_metadata")
    peft_meta = json.loads(raw) if raw else {}

    bad = sorted(k for k in sd if any(marker in k for marker in _UNSUPPORTED))
    if bad:
        kinds = sorted({v for k in bad for marker, v in _UNSUPPORTED.items() if marker in k})
        raise WeightsError(f"{name}: {', '.join(kinds)} is not a plain LoRA and minisd does not load it "
                           f"({len(bad)} keys, e.g. {_few(bad)})")
    kohya = _kohya_names(roots)
    parts: dict[str, dict[str, Tensor]] = {}
    unplaced = []
    for key, value in sd.items():
        parsed = _parse_key(key)
        if parsed is None:
            unplaced.append(key)
            continue
        root, module, role = parsed
        if root.startswith("kohya_"):
            if root in ("kohya_lora_te1", "kohya_lora_te2"):
                raise WeightsError(f"{name}: an SDXL LoRA (lora_te1_/lora_te2_ keys); minisd runs SD 1.x")
            target = kohya.get(f"{root.removeprefix('kohya_')}_{module}")
            if target is None:
                unplaced.append(key)
                continue
        else:
            if root == "text_encoder" and not module.startswith("text_model."):
                module = "text_model." + module  # transformers' flattened CLIP layout
            target = f"{root}.{module}"
        parts.setdefault(target, {})[role] = value

    out, problems = {}, []
    for target, p in parts.items():
        root = target.partition(".")[0]
        try:
            layer = _layer(roots, target) if root in roots else None
        except AttributeError:
            layer = None
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or "down" not in p or "up" not in p:
            unplaced += [f"{target} ({', '.join(sorted(p))})"]
            continue
        down, up = p["down"], p["up"]
        rank = down.shape[0]
        w = layer.weight
        if isinstance(layer, nn.Conv2d) and down.ndim == 2:
            down, up = down[:, :, None, None], up[:, :, None, None]  # a Linear LoRA on a 1×1 conv (SD2 names)
        if isinstance(layer, nn.Linear) and down.ndim == 4:
            down, up = down.flatten(1), up.flatten(1)                # a 1×1-conv LoRA on a Linear proj_in
        if down.shape[1:] != w.shape[1:] or up.shape[0] != w.shape[0] or up.shape[1] != rank:
            problems.append(f"{target}: A {tuple(p['down'].shape)}, B {tuple(p['up'].shape)} do not fit the "
                            f"layer's weight {tuple(w.shape)}")
            continue
        alpha = float(p["alpha"]) if "alpha" in p else _peft_alpha(peft_meta, root, target.partition(".")[2], rank)
        out[target] = (down, up, alpha)
    if unplaced or problems:
        msg = [f"{name}: this LoRA does not fit the model"]
        if unplaced:
            msg.append(f"{len(unplaced)} keys could not be placed on a layer: {_few(sorted(unplaced))}")
        if problems:
            msg.append(f"{len(problems)} shape mismatches: {_few(problems, 3)}")
        raise WeightsError("; ".join(msg))
    if not out:
        raise WeightsError(f"{name}: no LoRA weights found")
    return out


def build(roots: dict[str, nn.Module], weights: dict[str, tuple[Tensor, Tensor, float]]) -> dict[str, LoRA]:
    """LoRA modules holding `weights` (from read_lora), not yet attached."""
    loras = {}
    for path, (down, up, alpha) in weights.items():
        layer = _layer(roots, path)
        lora = LoRA(layer, down.shape[0], alpha)
        with torch.no_grad():
            lora.down.weight.copy_(down.view_as(lora.down.weight))
            lora.up.weight.copy_(up.view_as(lora.up.weight))
        loras[path] = lora.to(layer.weight.device)
    return loras


# ─── writing ───────────────────────────────────────────────────────────────────────────────────────

def lora_state_dict(loras: dict[str, LoRA], format: str = "peft",
                    dtype: torch.dtype | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) in diffusers/PEFT or kohya layout, readable by diffusers and A1111;
    `dtype` (e.g. torch.float16, as most LoRA files are) casts the weights, None keeps theirs."""
    sd: dict[str, Tensor] = {}

    def weight(layer: nn.Module) -> Tensor:
        return layer.weight.detach().cpu().to(dtype or layer.weight.dtype).contiguous()

    if format == "peft":
        for path, lora in loras.items():
            sd[f"{path}.lora_A.weight"] = weight(lora.down)
            sd[f"{path}.lora_B.weight"] = weight(lora.up)
        meta = {}
        for root in sorted({p.partition(".")[0] for p in loras}):
            # module names as PEFT matches them (by suffix): without transformers' `text_model.` level,
            # so they fit CLIP both nested (transformers 4) and flattened (transformers 5)
            group = {p.partition(".")[2].removeprefix("text_model."): lo for p, lo in loras.items()
                     if p.startswith(root + ".")}
            first = next(iter(group.values()))
            meta.update({f"{root}.r": first.rank, f"{root}.lora_alpha": first.alpha,
                         f"{root}.target_modules": sorted(group),
                         f"{root}.rank_pattern": {p: lo.rank for p, lo in group.items() if lo.rank != first.rank},
                         f"{root}.alpha_pattern": {p: lo.alpha for p, lo in group.items() if lo.alpha != first.alpha}})
        return sd, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}
    if format == "kohya":
        prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
        for path, lora in loras.items():
            root, _, rest = path.partition(".")
            name = prefixes[root] + rest.replace(".", "_")
            sd[f"{name}.lora_down.weight"] = weight(lora.down)
            sd[f"{name}.lora_up.weight"] = weight(lora.up)
            sd[f"{name}.alpha"] = torch.tensor(lora.alpha)
        first = next(iter(loras.values()))
        return sd, {"ss_network_module": "networks.lora", "ss_network_dim": str(first.rank),
                    "ss_network_alpha": str(first.alpha), "ss_v2": "False"}
    raise ValueError(f"format must be 'peft' or 'kohya', got {format!r}")


def save_lora(loras: dict[str, LoRA], path: str | os.PathLike, format: str = "peft",
              metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write LoRAs as .safetensors; a folder path gets diffusers' file name pytorch_lora_weights.safetensors."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "pytorch_lora_weights.safetensors"
    sd, meta = lora_state_dict(loras, format, dtype)
    write_safetensors(sd, path, {**meta, **(metadata or {})})
    return path


def parameter_count(loras: dict[str, LoRA]) -> int:
    return sum(p.numel() for lora in loras.values() for p in lora.parameters())


__all__ = ["LoRA", "ATTENTION_TARGETS", "attach", "detach", "inject", "fuse", "unfuse", "read_lora", "build",
           "lora_state_dict", "save_lora", "parameter_count"]
