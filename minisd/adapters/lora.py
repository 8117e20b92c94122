"""LoRA: low-rank adaptation of frozen layers (Hu et al. 2021), and the LoRA files people share.

A frozen weight W (out × in) gets a trainable low-rank update:

    W' = W + (α/r) · B A         A: r × in ("down", lora_A)   B: out × r ("up", lora_B)   r ≪ in, out
    y  = W x + (α/r) · B (A x)   — the same thing, computed without ever forming B A

B starts at zero, so a fresh LoRA changes nothing; A starts random, so gradients reach B at once.
For a convolution, A is a conv with W's kernel, stride and padding and B a 1×1 conv. α is a number
stored with the weights (kohya's `.alpha`, PEFT's `lora_alpha`); α = r means scale 1.

Attaching a LoRA swaps its layer for a LoRALinear / LoRAConv2d: the same layer type holding the same
weight and bias Parameters, plus the LoRAs in the module tree (state_dict, .to() and torch.compile see
them). Several LoRAs can sit on one layer, each with its own user scale; `fuse` folds them into W for
speed (`unfuse` restores W exactly), and detaching the last one puts a plain layer back. The model's
checkpoint keys do not change: `state_dict_to_save` is its state_dict without the LoRAs.

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
import numbers
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..formats.sdxl import sdxl_unet_prefix_table
from ..formats.weights import WeightsError, _few, _rename, read_metadata, read_state_dict, write_safetensors

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
        self.name: str | None = None  # the adapter it belongs to, set when attached ("train", a file's stem)
        self.multiplier = 1.0   # the user's scale (load_lora(scale=…), set_lora_scale)
        self.fused = False      # folded into the layer's weight: its forward then skips it

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


def check_scale(scale: float) -> float:
    """A LoRA's user scale: any finite number (0 switches it off, a negative one subtracts it)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"a LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


# ─── layers that carry LoRAs ───────────────────────────────────────────────────────────────────────

class _CarriesLoRAs:
    """What LoRALinear and LoRAConv2d add to their layer type.

    `weight` and `bias` are the very Parameters of the layer they replace, under the same names, so the
    model's checkpoint keys do not change. `loras` is a ModuleList, so state_dict(), .to(), .train() and
    torch.compile see the LoRAs: their tensors are saved as `<layer>.loras.<i>.down.weight` and
    `.up.weight`, i counting the layer's LoRAs in the order they were attached (a LoRA's name lives in
    `lora.name`: names such as "train" or "my.lora" cannot be module keys). `original_weight` is W
    before any LoRA was fused into it: a non-persistent buffer, so it follows .to() and is never saved.
    """

    loras: nn.ModuleList
    original_weight: Tensor | None

    def _adopt(self, layer: nn.Module) -> None:
        self.weight, self.bias = layer.weight, layer.bias
        self.loras = nn.ModuleList()
        self.register_buffer("original_weight", None, persistent=False)
        self.train(layer.training)

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)  # W x + b
        for lora in self.loras:   # + Σ multiplier · ΔW x, each LoRA in its own dtype
            if lora.multiplier and not lora.fused:
                out = out + lora.multiplier * lora(x.to(lora.up.weight.dtype)).to(out.dtype)
        return out

    def add(self, name: str, lora: LoRA) -> None:
        if any(lo.name == name for lo in self.loras):
            raise ValueError(f"a LoRA named {name!r} is already attached to this layer")
        lora.name = name
        self.loras.append(lora.to(device=self.weight.device))

    def remove(self, name: str) -> LoRA:
        i = next((i for i, lo in enumerate(self.loras) if lo.name == name), None)
        if i is None:
            raise KeyError(f"no LoRA named {name!r} on this layer; attached: {[lo.name for lo in self.loras]}")
        lora = self.loras[i]
        del self.loras[i]
        return lora

    def fuse(self, lora: LoRA) -> None:
        """W ← W + multiplier · ΔW; the original W is kept, so `refold` can restore it exactly."""
        if self.original_weight is None:
            self.original_weight = self.weight.detach().clone()
        with torch.no_grad():
            self.weight += (lora.multiplier * lora.delta_weight().float()).to(self.weight.dtype)
        lora.fused = True

    def refold(self) -> None:
        """W ← original W + the LoRAs still marked fused: bit for bit the original W when none is."""
        with torch.no_grad():
            self.weight.copy_(self.original_weight)
            for lora in self.loras:  # LoRAs of other adapters stay folded in
                if lora.fused:
                    self.weight += (lora.multiplier * lora.delta_weight().float()).to(self.weight.dtype)
        if not any(lo.fused for lo in self.loras):
            self.original_weight = None


class LoRALinear(_CarriesLoRAs, nn.Linear):
    """An nn.Linear with LoRAs: y = W x + b + Σ multiplier · (α/r) B A x."""

    def __init__(self, layer: nn.Linear):
        # built on the meta device, then given `layer`'s own weight and bias: nothing is allocated or copied
        super().__init__(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
        self._adopt(layer)

    def plain(self) -> nn.Linear:
        """An nn.Linear with the same weight and bias Parameters, and no LoRAs."""
        layer = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        layer.weight, layer.bias = self.weight, self.bias
        return layer.train(self.training)


def _conv_args(conv: nn.Conv2d) -> tuple:
    return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode)


class LoRAConv2d(_CarriesLoRAs, nn.Conv2d):
    """An nn.Conv2d with LoRAs: y = W ⋆ x + b + Σ multiplier · (α/r) B ⋆ (A ⋆ x), B a 1×1 convolution."""

    def __init__(self, layer: nn.Conv2d):
        super().__init__(*_conv_args(layer), device="meta")
        self._adopt(layer)

    def plain(self) -> nn.Conv2d:
        """An nn.Conv2d with the same weight and bias Parameters, and no LoRAs."""
        layer = nn.Conv2d(*_conv_args(self), device="meta")
        layer.weight, layer.bias = self.weight, self.bias
        return layer.train(self.training)


# ─── attaching LoRAs to a model ────────────────────────────────────────────────────────────────────

def _layer(roots: dict[str, nn.Module], path: str) -> nn.Module:
    root, _, rest = path.partition(".")
    return roots[root].get_submodule(rest)


def _swap(roots: dict[str, nn.Module], path: str, layer: nn.Module) -> None:
    """Put `layer` at `path` ("unet.….to_q") in place of the module there (minisd's own models only)."""
    root, _, rest = path.partition(".")
    parent, _, child = rest.rpartition(".")
    setattr(roots[root].get_submodule(parent), child, layer)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) for every Linear and Conv2d of `model` a LoRA can adapt: not the LoRAs' own A and B."""
    inside = {id(m) for lora in model.modules() if isinstance(lora, LoRA) for m in lora.modules()}
    return [(p, m) for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in inside]


def attach(roots: dict[str, nn.Module], name: str, loras: dict[str, LoRA]) -> None:
    """Add each LoRA to its layer ({module path: LoRA}) under `name`. The first LoRA of a layer swaps it
    for a LoRALinear / LoRAConv2d holding the same Parameters; its output becomes W x + Σ multiplier · ΔW x."""
    layers = {path: _layer(roots, path) for path in loras}
    taken = [p for p, layer in layers.items()
             if isinstance(layer, _CarriesLoRAs) and any(lo.name == name for lo in layer.loras)]
    if taken:
        raise ValueError(f"a LoRA named {name!r} is already attached to {len(taken)} of these layers, e.g. {taken[0]}")
    for path, lora in loras.items():
        layer = layers[path]
        if not isinstance(layer, _CarriesLoRAs):
            layer = LoRALinear(layer) if isinstance(layer, nn.Linear) else LoRAConv2d(layer)
            _swap(roots, path, layer)
        layer.add(name, lora)


def detach(roots: dict[str, nn.Module], name: str, loras: dict[str, LoRA]) -> None:
    """Take these LoRAs (attached under `name`) off their layers; a layer left with none is swapped back
    for a plain nn.Linear / nn.Conv2d with the same Parameters: the model is as it was before `attach`."""
    if any(lo.fused for lo in loras.values()):
        raise RuntimeError("unfuse LoRAs before removing them")
    for path in loras:
        layer = _layer(roots, path)
        layer.remove(name)
        if not layer.loras:
            _swap(roots, path, layer.plain())


def inject(roots: dict[str, nn.Module], name: str, rank: int, alpha: float | None = None,
           targets: Iterable[str] = ATTENTION_TARGETS, root: str = "unet") -> dict[str, LoRA]:
    """Fresh LoRAs on every layer of `roots[root]` whose name ends with one of `targets`
    (e.g. "to_q", "to_out.0", "proj_in", "ff.net.2", "q_proj"): {module path: LoRA}, ready to train."""
    targets = tuple(targets)
    out = {f"{root}.{path}": LoRA(layer, rank, alpha).to(layer.weight.device) for path, layer in _layers(roots[root])
           if any(path == t or path.endswith("." + t) for t in targets)}
    if not out:
        raise ValueError(f"no Linear/Conv2d layer of {root} ends with any of {targets}")
    attach(roots, name, out)
    return out


def fuse(roots: dict[str, nn.Module], loras: dict[str, LoRA]) -> None:
    """W ← W + multiplier · ΔW for each LoRA (the original W is kept, so unfuse is exact)."""
    for path, lora in loras.items():
        if not lora.fused:
            _layer(roots, path).fuse(lora)


def unfuse(roots: dict[str, nn.Module], loras: dict[str, LoRA]) -> None:
    """Undo `fuse` for these LoRAs: W back to its original values, bit for bit when all are unfused."""
    paths = [path for path, lora in loras.items() if lora.fused]
    for path in paths:
        loras[path].fused = False
    for path in paths:
        _layer(roots, path).refold()


def state_dict_to_save(model: nn.Module) -> dict[str, Tensor]:
    """What a saved model holds: `model.state_dict()` without the LoRAs' tensors (the keys it had before
    any LoRA was attached), fused LoRAs inside the weights. A LoRA still applied on the fly would be
    lost: RuntimeError."""
    carriers = [(p, m) for p, m in model.named_modules() if isinstance(m, _CarriesLoRAs)]
    unfused = sorted({lo.name for _, m in carriers for lo in m.loras if not lo.fused})
    if unfused:
        raise RuntimeError(f"LoRAs {unfused} are applied on the fly and would not be saved: fuse them into the "
                           f"weights first (pipe.fuse_lora()), or unload them (pipe.unload_lora())")
    lora_keys = tuple(f"{p}.loras." if p else "loras." for p, _ in carriers)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(lora_keys)}


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
    for prefix in ("unet.", "text_encoder_2.", "text_encoder."):
        if key.startswith(prefix):
            root, key = prefix[:-1], key[len(prefix):]
    if m := re.fullmatch(r"(.+)\.lora_([AB])\.weight", key):  # PEFT
        return root, m[1], "down" if m[2] == "A" else "up"
    if m := re.fullmatch(r"(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight", key):  # diffusers after PEFT
        return root, m[1], m[2]
    if m := re.fullmatch(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight", key):  # attn procs
        proj = _OLD_ATTN[m[2]] if root.startswith("text_encoder") else ("to_out.0" if m[2] == "to_out" else m[2])
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
        paths = [p for p, _ in _layers(unet)]
        for p in paths:
            names["lora_unet_" + p.replace(".", "_")] = "unet." + p
        if hasattr(unet, "config"):  # LoRAs made with LDM/sgm names (SD 1.x's and kohya's SDXL ones): input_blocks_4_1_…
            ldm = _rename({p + ".weight": None for p in paths}, sdxl_unet_prefix_table(unet.config), "U-Net",
                          reverse=True)
            for key, p in zip(ldm, paths):
                names["lora_unet_" + key.removesuffix(".weight").replace(".", "_")] = "unet." + p
    sdxl = "text_encoder_2" in roots   # kohya: lora_te1_ (CLIP ViT-L) and lora_te2_ (OpenCLIP bigG) for SDXL
    for root, prefix in (("text_encoder", "lora_te1_" if sdxl else "lora_te_"), ("text_encoder_2", "lora_te2_")):
        te = roots.get(root)
        if te is not None:
            for p, _ in _layers(te):
                names[prefix + p.replace(".", "_")] = f"{root}.{p}"
                names[prefix + p.removeprefix("text_model.").replace(".", "_")] = f"{root}.{p}"
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
            if root in ("kohya_lora_te1", "kohya_lora_te2") and "text_encoder_2" not in roots:
                raise WeightsError(f"{name}: an SDXL LoRA (lora_te1_/lora_te2_ keys); load it into an SDXL pipeline")
            target = kohya.get(f"{root.removeprefix('kohya_')}_{module}")
            if target is None:
                unplaced.append(key)
                continue
        else:
            if root.startswith("text_encoder") and not module.startswith("text_model."):
                module = "text_model." + module  # transformers' flattened CLIP layout
            target = f"{root}.{module}"
        parts.setdefault(target, {})[role] = value

    adaptable = {f"{r}.{path}": m for r, model in roots.items() if model is not None for path, m in _layers(model)}
    out, problems = {}, []
    for target, p in parts.items():
        root = target.partition(".")[0]
        layer = adaptable.get(target)
        if layer is None or "down" not in p or "up" not in p:
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


__all__ = ["LoRA", "LoRALinear", "LoRAConv2d", "ATTENTION_TARGETS", "attach", "detach", "inject", "fuse", "unfuse",
           "state_dict_to_save", "check_scale", "read_lora", "build", "lora_state_dict", "save_lora", "parameter_count"]
