"""Pictures in and out: paths, PIL images, arrays and tensors to the (B, 3, H, W) tensors in [-1, 1]
the models take; masks to 0/1; results back to PIL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

ImageInput = Image.Image | Tensor | np.ndarray | str | Path


def load_image(image: ImageInput, name: str = "image") -> Image.Image | Tensor:
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"{name} file not found: {image}")
        return Image.open(image)
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    if not isinstance(image, (Image.Image, Tensor)):
        raise TypeError(f"{name} must be a PIL image, a tensor, an array or a path, got {type(image).__name__}")
    return image


def image_to_tensor(image: ImageInput | list[ImageInput], height: int | None = None,
                    width: int | None = None) -> Tensor:
    """A picture as (1, 3, H, W) in [-1, 1]; H, W rounded down to multiples of 8 (or resized to the
    requested size). Tensors are taken as (B, 3, H, W) in [0, 1]. A list of pictures gives (n, 3, H, W),
    each resized to the first one's size, as diffusers' image processor does."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("image is an empty list")
        first = image_to_tensor(image[0], height, width)
        h, w = first.shape[-2:]
        return torch.cat([first] + [image_to_tensor(im, h, w) for im in image[1:]])
    image = load_image(image)
    if isinstance(image, Tensor):
        x = image[None] if image.ndim == 3 else image
        x = x.float()
    else:
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    H, W = x.shape[-2:]
    h, w = (height or H), (width or W)
    h, w = h - h % 8, w - w % 8
    if (h, w) != (H, W):
        x = torch.cat([_resize(xi, h, w) for xi in x])
    return x * 2 - 1


def _resize(x: Tensor, h: int, w: int) -> Tensor:
    """(3, H, W) in [0, 1] -> (1, 3, h, w), Lanczos through PIL (what diffusers' image processor uses)."""
    pil = Image.fromarray((x.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))
    return torch.from_numpy(np.asarray(pil.resize((w, h), Image.LANCZOS), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def mask_to_tensor(mask: ImageInput | list[ImageInput], height: int, width: int) -> Tensor:
    """A mask as (1, 1, H, W) of 0/1 (white = 1 = repaint), binarised at 0.5; it must match the image size.
    A list of masks, or a tensor (n, 1, H, W), gives (n, 1, H, W)."""
    if isinstance(mask, (list, tuple)):
        if not mask:
            raise ValueError("mask_image is an empty list")
        return torch.cat([mask_to_tensor(m, height, width) for m in mask])
    mask = load_image(mask, "mask_image")
    if isinstance(mask, Tensor):
        m = mask.float()
        m = (m[None, None] if m.ndim == 2 else m[None] if m.ndim == 3 else m)[:, :1]  # (n, 1, H, W): first channel
    else:
        m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
    if tuple(m.shape[-2:]) != (height, width):
        raise ValueError(f"mask_image is {m.shape[-1]}x{m.shape[-2]} but the image is {width}x{height}; "
                         f"give a mask of the same size")
    return (m >= 0.5).float()


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images."""
    arr = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
