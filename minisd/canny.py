"""Canny edges (Canny 1986), the control image of the most used ControlNet, in NumPy.

It follows OpenCV's `cv2.Canny(image, low, high)` — what diffusers' and lllyasviel's examples call —
step by step, so the same photo gives the same edge map without an OpenCV dependency:

  1. gradients  gx, gy: 3×3 Sobel filters (no blur first: cv2.Canny does not smooth)
  2. magnitude  |gx| + |gy| (cv2's default L1 norm); on colour images, per pixel the channel with the
                largest magnitude
  3. thinning   keep a pixel only if it is a maximum along its gradient direction (0°, 45°, 90°, 135°)
  4. hysteresis pixels above `high` are edges; pixels above `low` are edges if connected (8-neighbours)
                to an edge
"""

from __future__ import annotations

import numpy as np
from PIL import Image

TAN_22_5 = 0.4142135623730951  # tan(22.5°): the boundary between the four directions


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(x, 1, mode="edge")  # cv2.Canny's BORDER_REPLICATE
    H, W = x.shape
    s = lambda dy, dx: p[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]  # noqa: E731
    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    return gx, gy


def canny(image: Image.Image | np.ndarray, low: float = 100, high: float = 200) -> Image.Image:
    """Edges of `image` as a white-on-black RGB picture, ready as a ControlNet control_image."""
    if low > high:
        raise ValueError(f"low threshold {low} must not exceed high threshold {high}")
    px = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if px.ndim == 2:
        px = px[..., None]
    grads = [_sobel(px[..., c]) for c in range(px.shape[-1])]
    mags = np.stack([np.abs(gx) + np.abs(gy) for gx, gy in grads])
    best = mags.argmax(0)
    take = lambda arrs: np.take_along_axis(np.stack(arrs), best[None], 0)[0]  # noqa: E731
    mag, gx, gy = mags.max(0), take([g[0] for g in grads]), take([g[1] for g in grads])

    # 3. non-maximum suppression: compare with the two neighbours along the gradient
    H, W = mag.shape
    m = np.pad(mag, 1)
    n = lambda dy, dx: m[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]  # noqa: E731
    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay < TAN_22_5 * ax               # gradient along x: compare left/right
    vertical = ay > ax / TAN_22_5                 # gradient along y: compare up/down
    same_sign = (gx * gy) >= 0
    keep = np.where(horizontal, (mag > n(0, -1)) & (mag >= n(0, 1)),
                    np.where(vertical, (mag > n(-1, 0)) & (mag >= n(1, 0)),
                             np.where(same_sign, (mag > n(-1, -1)) & (mag > n(1, 1)),  # diagonals: strict on
                                      (mag > n(-1, 1)) & (mag > n(1, -1)))))   # both sides, as cv2
    candidate = keep & (mag > low)

    # 4. hysteresis: grow the strong edges through the weak ones
    edges = candidate & (mag > high)
    while True:
        e = np.pad(edges, 1)
        grown = candidate & np.any([e[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
                                    for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        if (grown == edges).all():
            break
        edges = grown
    out = (edges * 255).astype(np.uint8)
    return Image.fromarray(np.stack([out] * 3, axis=-1))
