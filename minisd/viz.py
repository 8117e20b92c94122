"""Pictures for the notebooks: image grids, schedule plots, attention overlays.

Every function returns something a notebook can display (a PIL image or a matplotlib figure) and
draws nothing it was not asked for.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_pil(x: torch.Tensor | np.ndarray | Image.Image, value_range: tuple[float, float] = (-1, 1)) -> Image.Image:
    """A (3, H, W) / (H, W, 3) tensor or array in `value_range` (default [-1, 1]) as a PIL image."""
    if isinstance(x, Image.Image):
        return x
    x = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x).detach().float().cpu()
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = x.permute(1, 2, 0)
    lo, hi = value_range
    arr = ((x - lo) / (hi - lo)).clamp(0, 1).numpy()
    arr = (arr * 255).round().astype(np.uint8)
    return Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr)


def image_grid(images, nrow: int | None = None, labels: list[str] | None = None, scale: int = 1,
               pad: int = 2) -> Image.Image:
    """Images (PIL or tensors in [-1, 1]) in a grid, `nrow` per row, optional labels under each."""
    images = [to_pil(im) for im in images]
    n = len(images)
    nrow = nrow or min(n, 8)
    w, h = images[0].size
    w, h = w * scale, h * scale
    label_h = 12 if labels else 0
    rows = math.ceil(n / nrow)
    grid = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad + label_h) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, nrow)
        x, y = pad + c * (w + pad), pad + r * (h + pad + label_h)
        grid.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
        if labels:
            draw.text((x + 1, y + h), str(labels[i])[: max(w // 6, 1)], fill=(0, 0, 0))
    return grid


def show(images, titles: list[str] | None = None, ncols: int | None = None, size: float = 2.0, suptitle=None):
    """A matplotlib figure of images with titles (for notebooks)."""
    import matplotlib.pyplot as plt

    images = [to_pil(im) for im in images]
    n = len(images)
    ncols = ncols or min(n, 6)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, im in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(im, interpolation="nearest")
        if titles:
            ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def attention_overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.6) -> Image.Image:
    """A (h, w) attention map, upsampled to the image and blended over it in red-yellow."""
    import matplotlib

    heat = heat.detach().float().cpu()
    heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-8)
    W, H = image.size
    up = torch.nn.functional.interpolate(heat[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    colours = (matplotlib.colormaps["inferno"](up.numpy())[..., :3] * 255).astype(np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray((base * (1 - alpha) + colours * alpha).round().astype(np.uint8))


def token_maps(maps: dict[str, list[torch.Tensor]], step: int | slice = slice(None), batch_index: int = -1,
               ) -> torch.Tensor:
    """Average captured cross-attention (see `capture_attention`) over layers, heads and steps into
    one map per token: (T, h, w) at the finest resolution captured. `batch_index` picks the image in
    the batch (with CFG the conditional half comes last)."""
    per_layer = []
    size = max(int(math.isqrt(m[0].shape[2])) for m in maps.values() if m)
    for calls in maps.values():
        chosen = calls[step] if isinstance(step, slice) else [calls[step]]
        for probs in chosen:  # (B, nh, L, T)
            p = probs[batch_index].mean(0)  # (L, T)
            s = int(math.isqrt(p.shape[0]))
            p = p.T.reshape(-1, 1, s, s)
            per_layer.append(torch.nn.functional.interpolate(p, size=(size, size), mode="bilinear",
                                                             align_corners=False)[:, 0])
    return torch.stack(per_layer).mean(0)
