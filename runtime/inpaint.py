"""Inpainting and outpainting inputs, torch-free: the canvas, the mask, and which tokens each scale keeps.

A mask is white where to generate and black where to keep the known image. It is area-resampled to
every scale's token grid; a token keeps the known image's token unless its whole area is to be
generated, so content that reaches into a token survives at every scale; the pixels with nothing
to generate show the input's VQVAE reconstruction. Eager generation (``ecm.model.inpaint``) and the
runtime's scale loop read the same masks from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ECMError
from .images import read_image, to_rgb
from .resample import area_matrix

#: Sides ``--outpaint`` extends, as ``side=pixels`` pairs.
SIDES = ("left", "right", "top", "bottom")
#: A token whose area is at least this share to be generated is generated (1 up to float rounding).
FULL = 1 - 1e-6


def keep_masks(generate_BRR: np.ndarray, patch_nums: tuple[int, ...] | list[int]) -> list[np.ndarray]:
    """Per scale, (B, pn*pn) bool: True where the token keeps the known image's (not all of its area generated)."""
    gen = np.asarray(generate_BRR, np.float64)
    R = gen.shape[-1]
    out = []
    for pn in patch_nums:
        P = area_matrix(R, pn)
        frac_Bpp = P @ gen @ P.T
        out.append((frac_Bpp < FULL).reshape(gen.shape[0], pn * pn))
    return out


def kept_pixels(generate_BRR: np.ndarray) -> np.ndarray:
    """(B, R, R) bool: the pixels none of which is to be generated. The output shows the VQVAE's reconstruction of
    the input there: the decoder sees the whole latent, so generated tokens would otherwise bleed into them."""
    return np.asarray(generate_BRR) == 0


@dataclass
class Inpaint:
    """What a generation keeps: the canvas (uint8 (R, R, 3)) and where to generate (float32 (R, R), 1 = generate)."""

    image: np.ndarray
    generate: np.ndarray

    def batch(self, B: int) -> tuple[np.ndarray, np.ndarray]:
        """The canvas and mask repeated for B images."""
        return np.repeat(self.image[None], B, axis=0), np.repeat(self.generate[None], B, axis=0)


def _resized(img: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    return img if img.size == size else img.resize(size, resample)


def inpaint_input(init: str | Path, mask: str | Path, resolution: int) -> Inpaint:
    """``--init`` and ``--mask`` as a canvas at the model's size: both square and of one size (resized together)."""
    image, drawn = read_image(init, "--init image"), read_image(mask, "--mask image")
    if drawn.size != image.size:
        raise ECMError(f"--mask is {drawn.size[0]}x{drawn.size[1]} but --init is {image.size[0]}x{image.size[1]}; "
                       "draw the mask at the size of the image")
    if image.size[0] != image.size[1]:
        raise ECMError(f"--init is {image.size[0]}x{image.size[1]}, not square; crop it square, or extend it with "
                       "--outpaint instead of --mask")
    R = (resolution, resolution)
    grey = np.asarray(to_rgb(drawn).convert("L"), np.float32) / 255
    generate = np.asarray(_resized(Image.fromarray(grey, mode="F"), R, Image.BOX), np.float32).clip(0, 1)
    if not generate.any():
        raise ECMError(f"--mask {mask} is black everywhere: nothing to generate; paint white where to generate")
    return Inpaint(np.asarray(_resized(to_rgb(image), R, Image.LANCZOS), np.uint8), generate)


def parse_margins(text: str) -> dict[str, int]:
    """``left=16,right=16`` -> {'left': 16, 'right': 16}; sides not named are 0."""
    margins = dict.fromkeys(SIDES, 0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        side, _, value = part.partition("=")
        if side not in SIDES or not value.strip().isdigit():
            raise ECMError(f"--outpaint {text!r}: each part is side=pixels with a side among {', '.join(SIDES)} "
                           "(e.g. left=16,right=16)")
        margins[side] = int(value)
    return margins


def outpaint_input(init: str | Path, margins: dict[str, int], resolution: int) -> Inpaint:
    """The canvas for ``--outpaint`` of the image file ``init``: see :func:`outpaint_canvas`."""
    return outpaint_canvas(read_image(init, "--init image"), margins, resolution)


def outpaint_canvas(image: Image.Image, margins: dict[str, int], resolution: int) -> Inpaint:
    """The image resized into the box the margins leave (margins in output pixels), the margins filled by
    repeating its border, and a mask that generates the margins."""
    R = resolution
    left, right, top, bottom = (margins.get(s, 0) for s in SIDES)
    w, h = R - left - right, R - top - bottom
    if not any(margins.values()) or w < 1 or h < 1:
        raise ECMError(f"--outpaint margins {margins} leave no room: they must add up to less than the "
                       f"model's {R} pixels per side, and at least one must be positive")
    box = np.asarray(_resized(to_rgb(image), (w, h), Image.LANCZOS), np.uint8)
    canvas = np.pad(box, ((top, bottom), (left, right), (0, 0)), mode="edge")
    generate = np.ones((R, R), np.float32)
    generate[top:top + h, left:left + w] = 0
    return Inpaint(canvas, generate)
