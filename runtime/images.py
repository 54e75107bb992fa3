"""Images in and out, torch-free: reading any image file upright, the official resize, conditions, PNG grids.

Training and the runtime share these functions, so a condition is prepared the same way for both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .controls import control_type, find_control, to_rgb_map
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


def read_image(path: str | Path, what: str = "condition image") -> Image.Image:
    """Open an image file fully and upright, or fail with one line that names the file.

    Every image file the toolkit reads comes through here (training data, control maps,
    calibration and ``ecm-run`` conditions), so all of them honour the EXIF orientation a phone
    or camera records instead of being used sideways.
    """
    path = Path(path)
    if not path.is_file():
        raise ECMError(f"{what} {path} does not exist; pass an existing image file")
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img)  # a loaded copy, turned as the EXIF orientation says
    except Image.DecompressionBombError as e:
        raise ECMError(f"cannot read {what} {path}: {str(e).rstrip('.')}; pass a smaller image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ECMError(f"cannot read {what} {path} ({type(e).__name__}); replace it with a PNG or JPEG file") \
            from None


#: A binary control's condition (an edge map) must be essentially black and white: the mean distance of its
#: pixels from black or white at most this share of the range. Edge maps measured 0.00-0.07 as PNG, JPEG or
#: enlarged, up to 0.16 shrunk to a quarter; photos 0.21-0.43 (tests/data/photos, the procedural shapes).
MAX_GREYNESS = 0.18


def greyness(arr_HW3: np.ndarray) -> float:
    """Mean distance of the pixels (brightest channel) from black or white, as a share of the range (0..0.5)."""
    step = max(1, max(arr_HW3.shape[:2]) // 1024)  # every pixel up to 1024 px; a grid of them beyond
    g = arr_HW3[::step, ::step].max(axis=2).astype(np.float32)
    return float(np.mean(np.minimum(g, 255 - g)) / 255)


def prepare_condition(img: Image.Image, spec: ControlSpec, extract: bool = False, raw: bool = False,
                      source: str = "the condition") -> np.ndarray:
    """The control graph's input for one image: uint8 (R, R, 3).

    ``extract``: ``img`` is a photo and its map is computed here with the control's extractor, as in
    training. Otherwise it is the map itself: used as is at the model's size, enlarged by repeating
    pixels at its control's small size (``lowres``: a quarter), else resized like training images.
    A binary control's map (Canny edges) must be essentially black and white, or this fails naming
    ``source``; it is made two-valued again after resizing. ``raw`` skips both.
    """
    R = spec.resolution
    if extract:
        return control_type(spec.type).extract(preprocess(img, R), spec)
    rgb = to_rgb(img)
    arr = np.asarray(rgb, dtype=np.uint8)
    kind = find_control(spec.type)
    binary = kind is not None and kind.binary and not raw
    if binary and greyness(arr) > MAX_GREYNESS:
        how = f"--control {spec.type} to extract its {spec.type} map" if kind.extractor else "the map itself"
        raise ECMError(f"{source} does not look like a {spec.type} map (it is not black and white: "
                       f"{100 * greyness(arr):.0f}% grey, maps are under {100 * MAX_GREYNESS:.0f}%); pass {how}, "
                       "or --raw-cond to use it as it is")
    scale = kind.map_scale if kind is not None else 1
    if scale > 1 and rgb.size == (R // scale, R // scale):
        arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
    elif rgb.size != (R, R):
        arr = preprocess(rgb, R)
    if binary:
        arr = to_rgb_map(np.where(arr.max(axis=2) > 127, 255, 0).astype(np.uint8))
    return arr


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
