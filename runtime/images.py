"""Images in and out, torch-free: reading any condition image, the official resize, Canny, PNG grids.

Training and the runtime share these functions, so a condition is prepared the same way for both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ECMError
from .files import atomic_path
from .manifest import ControlSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: Longest side / shortest side that :func:`preprocess` resizes whole; of a longer strip only the middle counts.
MAX_ASPECT = 64


def preprocess(img: Image.Image, resolution: int) -> np.ndarray:
    """The official VAR evaluation preprocessing: shorter side to round(1.125 x res) with Lanczos,
    then a centre crop, with torchvision's Resize / CenterCrop arithmetic. Returns uint8 (H, W, 3).

    A strip longer than ``MAX_ASPECT`` : 1 is first cut to its middle, so a small file of 1 x 100000
    pixels cannot blow up into gigabytes at the resize; the centre crop never reaches the part cut."""
    w, h = img.size
    cw, ch = min(w, MAX_ASPECT * h), min(h, MAX_ASPECT * w)
    if (cw, ch) != (w, h):
        img = img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    img = to_rgb(img)
    mid = round(resolution * 1.125)
    w, h = img.size
    size = (mid, int(mid * h / w)) if w <= h else (int(mid * w / h), mid)
    img = img.resize(size, Image.LANCZOS)
    w, h = img.size
    left, top = round((w - resolution) / 2.0), round((h - resolution) / 2.0)
    return np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16/32-bit and float greys are rescaled, transparency goes on black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and arr.max() <= 1.0 else (65535.0 if arr.max() > 255 else 255.0)
        img = Image.fromarray(np.clip(arr / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def read_image(path: str | Path) -> Image.Image:
    """Open an image file fully, or fail with one line that names the file."""
    path = Path(path)
    if not path.is_file():
        raise ECMError(f"condition image {path} does not exist; pass an existing image file")
    try:
        img = Image.open(path)
        img.load()
    except Image.DecompressionBombError as e:
        raise ECMError(f"cannot read {path}: {str(e).rstrip('.')}; pass a smaller image") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ECMError(f"cannot read {path} as an image ({type(e).__name__}); pass a PNG or JPEG") from None
    return img


def canny_edges(img_HW3: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Binary edge map (0 / 255, uint8) of an RGB image: OpenCV Canny on its grey version."""
    try:
        import cv2
    except ImportError:
        raise ECMError("Canny edges need OpenCV: pip install opencv-python-headless") from None
    return cv2.Canny(cv2.cvtColor(np.ascontiguousarray(img_HW3), cv2.COLOR_RGB2GRAY), low, high)


def prepare_condition(img: Image.Image, spec: ControlSpec, extract: bool) -> np.ndarray:
    """The control graph's input for one image: uint8 (R, R, 3).

    ``extract``: ``img`` is a photo and the edges are computed here, as in training. Otherwise it is
    the map itself: used as is at the model's size, else resized like training images; Canny maps
    are made binary again (white edges on black, like OpenCV's output).
    """
    R = spec.resolution
    if extract:
        if spec.type != "canny":
            raise ECMError(f"this engine's adapters follow {spec.type!r}; only Canny edges can be extracted "
                           "here, so pass the control map itself")
        return to_rgb_map(canny_edges(preprocess(img, R), spec.canny_low, spec.canny_high))
    rgb = to_rgb(img)
    arr = np.asarray(rgb, dtype=np.uint8) if rgb.size == (R, R) else preprocess(rgb, R)
    if spec.type == "canny":
        arr = to_rgb_map(np.where(arr.max(axis=2) > 127, 255, 0).astype(np.uint8))
    return arr


def to_rgb_map(map_: np.ndarray) -> np.ndarray:
    """A grey map (..., H, W) as RGB (..., H, W, 3): how control maps are fed to the model."""
    return np.repeat(map_[..., None], 3, axis=-1)


def zoom(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling, so that small images stay visible in a grid."""
    return img if factor == 1 else img.repeat(factor, axis=0).repeat(factor, axis=1)


def save_png(arr_HW3: np.ndarray, path: str | Path) -> None:
    """Write a uint8 RGB array as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(arr_HW3).save(tmp, format="PNG")


def grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tile equally sized uint8 images (H, W, 3) into rows, separated by ``pad`` white pixels."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) - pad, cols * (w + pad) - pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            out[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = img
    return out
