"""Pictures in and out: paths, PIL images, arrays and tensors to the (B, 3, H, W) tensors in [-1, 1]
the models take; masks to 0/1; results back to PIL.

Every PIL mode is read as what it shows: 8-bit modes (L, RGB, P, CMYK, YCbCr, 1, ...) through PIL's
own conversion to RGB; 16-bit grayscale (I;16*, and I, as which some Pillow versions open 16-bit PNGs)
divided by 65535; floats (F) taken as [0, 1].
Alpha (RGBA, LA, PA, P with transparency) is dropped, not composited: the colour under a transparent
pixel is kept, as diffusers' image processor does with `convert("RGB")`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

ImageInput = Image.Image | Tensor | np.ndarray | str | Path

MIN_SIZE = 8  # px: one latent pixel of SD's VAE (f = 8)
_WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit PNGs open as one of these


def load_image(image: ImageInput, name: str = "image") -> Image.Image | Tensor:
    """A path (read and decoded now, so a bad file fails here), PIL image, array or tensor."""
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"{name} file not found: {image}")
        try:
            with Image.open(image) as im:
                im.load()  # decode now: a truncated file fails here, not halfway through a resize
                return im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"{name} file {image} is not a readable picture ({type(e).__name__}: {e})") from e
    if isinstance(image, np.ndarray):
        return _array_to_tensor(image, name)
    if not isinstance(image, (Image.Image, Tensor)):
        raise TypeError(f"{name} must be a PIL image, a tensor, an array or a path, got {type(image).__name__}")
    return image


def _array_to_tensor(a: np.ndarray, name: str) -> Tensor:
    """(H, W), (H, W, 1|3|4) arrays: uint8 in 0..255, uint16 in 0..65535, floats in [0, 1] -> (3, H, W)."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name} array has shape {a.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if a.dtype == np.uint8:
        x = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        x = a.astype(np.float32) / 65535.0
    elif a.dtype.kind == "f":
        x = a.astype(np.float32)
    else:
        raise ValueError(f"{name} array has dtype {a.dtype}; expected uint8, uint16 or floats in [0, 1]")
    x = np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x[:, :, :3]  # gray -> RGB; alpha dropped
    return check_pixels(torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1), name)


def pil_to_tensor(image: Image.Image, name: str = "image") -> Tensor:
    """A PIL image of any mode as (3, H, W) in [0, 1] (see the module docstring for each mode)."""
    if image.mode in _WIDE_GRAY or image.mode == "F":
        a = np.array(image, dtype=np.float32)  # a writable copy
        if image.mode != "F":
            a = a / 65535.0
        return check_pixels(torch.from_numpy(a)[None].expand(3, -1, -1).clone(), name)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL wants palette transparency to go through RGBA
    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"{name} has PIL mode {image.mode!r}, which cannot be converted to RGB") from e
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)


def check_pixels(x: Tensor, name: str = "image") -> Tensor:
    """Pixels must be finite and in [0, 1]: 0..255 values or NaNs would otherwise pass on silently."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"{name} values span [{x.min().item():g}, {x.max().item():g}]; expected [0, 1] "
                         f"(divide 0..255 by 255; map [-1, 1] with (x + 1) / 2)")
    return x


def _check_size(value, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < MIN_SIZE):
        raise ValueError(f"{what} = {value!r}; expected an integer of at least {MIN_SIZE} px")


def image_to_tensor(image: ImageInput | list[ImageInput], height: int | None = None,
                    width: int | None = None) -> Tensor:
    """A picture as (1, 3, H, W) in [-1, 1]; H, W rounded down to multiples of 8 (or resized to the
    requested size). Tensors are taken as (B, 3, H, W) in [0, 1]. A list of pictures gives (n, 3, H, W),
    each resized to the first one's size, as diffusers' image processor does."""
    _check_size(height, "height")
    _check_size(width, "width")
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("image is an empty list")
        first = image_to_tensor(image[0], height, width)
        h, w = first.shape[-2:]
        return torch.cat([first] + [image_to_tensor(im, h, w) for im in image[1:]])
    image = load_image(image)
    if isinstance(image, Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensor has shape {tuple(image.shape)}; expected (3, H, W) or (B, 3, H, W)")
        x = check_pixels(x.float(), "image")
    else:
        x = pil_to_tensor(image)[None]
    H, W = x.shape[-2:]
    if H < MIN_SIZE or W < MIN_SIZE:
        raise ValueError(f"image is {W}x{H} px; expected at least {MIN_SIZE}x{MIN_SIZE}")
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
    A list of masks, or a tensor (n, 1, H, W), gives (n, 1, H, W). Colour masks are read as luminance."""
    if isinstance(mask, (list, tuple)):
        if not mask:
            raise ValueError("mask_image is an empty list")
        return torch.cat([mask_to_tensor(m, height, width) for m in mask])
    mask = load_image(mask, "mask_image")
    if isinstance(mask, Tensor):
        if mask.ndim not in (2, 3, 4):
            raise ValueError(f"mask_image tensor has shape {tuple(mask.shape)}; expected (H, W) or (n, 1, H, W)")
        m = check_pixels(mask.float(), "mask_image")  # bool and 0/1 integer masks are fine; 0..255 is not
        m = (m[None, None] if m.ndim == 2 else m[None] if m.ndim == 3 else m)[:, :1]  # (n, 1, H, W): first channel
    elif mask.mode in _WIDE_GRAY or mask.mode == "F":
        m = pil_to_tensor(mask, "mask_image")[:1][None]
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


# ─── animations: a clip's frames in one file ─────────────────────────────────────────────────────

ANIMATIONS = {".gif": "GIF", ".webp": "WEBP", ".mp4": "MP4"}  # file ending -> what `save_animation` writes
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286  # the Exif sub-IFD and its UserComment tag (EXIF 2.3, table 7)


def mp4_available() -> bool:
    """MP4 is written through imageio-ffmpeg (an ffmpeg binary in a Python package), which minisd does not need:
    True when it is installed and finds its ffmpeg."""
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        return False
    import imageio_ffmpeg  # optional: imported only when an MP4 is asked for

    try:
        imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:  # installed without a usable ffmpeg binary
        return False
    return True


def save_animation(frames: list[Image.Image], target: str | Path, fmt: str, fps: int, text: str = "") -> None:
    """The frames as one looping animation at `fps` frames per second, `text` (the settings) in its metadata:
    GIF: the comment extension; WebP (lossless): the EXIF UserComment, UTF-16 after "UNICODE\\0" as AUTOMATIC1111
    writes it in pictures; MP4 (H.264, imageio-ffmpeg): the container's comment tag. `fmt`: a value of ANIMATIONS
    (the format is given, not guessed from `target`'s name, so that a temporary name does as well)."""
    if not frames:
        raise ValueError("an animation needs at least one frame")
    duration = round(1000 / fps)  # ms per frame; GIF stores hundredths of a second
    first, rest = frames[0].convert("RGB"), [f.convert("RGB") for f in frames[1:]]
    if fmt == "GIF":
        first.save(target, "GIF", save_all=True, append_images=rest, duration=duration, loop=0, comment=text)
    elif fmt == "WEBP":
        exif = Image.Exif()
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
        first.save(target, "WEBP", save_all=True, append_images=rest, duration=duration, loop=0, lossless=True,
                   exif=exif)
    elif fmt == "MP4":
        _save_mp4([first, *rest], target, fps, text)
    else:
        raise ValueError(f"unknown animation format {fmt!r}; expected one of {', '.join(ANIMATIONS.values())}")


def _save_mp4(frames: list[Image.Image], target: str | Path, fps: int, text: str) -> None:
    if not mp4_available():
        raise ValueError("writing .mp4 needs imageio-ffmpeg and its ffmpeg (pip install imageio-ffmpeg); .gif and "
                         ".webp need nothing more")
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(str(target), frames[0].size, fps=fps, codec="libx264", quality=None,
                                         output_params=["-f", "mp4", "-crf", "18", "-metadata", f"comment={text}"],
                                         macro_block_size=1)
    writer.send(None)  # start the ffmpeg process
    for frame in frames:
        writer.send(np.ascontiguousarray(np.asarray(frame)))
    writer.close()
