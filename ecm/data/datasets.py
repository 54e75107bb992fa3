"""Datasets: an image folder (ImageNet layout or flat) and a procedural set that needs no download.

Both yield uint8 RGB arrays (H, W, 3) at the model's resolution and an int class label; control
maps are computed from (or paired with) that array, so image and map always line up. NumPy and
PIL only: export verification and INT8 calibration draw their held-out conditions from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from ecm.runtime.errors import ECMError
from ecm.runtime.images import IMAGE_SUFFIXES, preprocess, read_image

#: Procedural-set seeds: training images come from seed 0, held-out evaluation images from this one.
HELD_OUT_SEED = 1000
#: Classes of the procedural set: one shape kind each.
SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond", "ellipse", "bars")


class Dataset(Protocol):
    """What training and evaluation read: uint8 RGB images at the model's resolution and int labels."""

    classes: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...


@dataclass
class ImageFolder:
    """Images under ``root``: one sub-folder per class (sorted names -> 0..n-1), or flat (class 0)."""

    root: Path
    resolution: int

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise ECMError(f"data folder {self.root} does not exist; pass --data with a folder of images")
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        self.classes = [p.name for p in subdirs] or ["all"]
        self.items: list[tuple[Path, int]] = []
        for label, folder in enumerate(subdirs or [self.root]):
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            self.items += [(p, label) for p in files]
        if not self.items:
            raise ECMError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {self.root}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.items[i]
        return preprocess(read_image(path, "image"), self.resolution), label


class InMemory:
    """A dataset held as arrays: images uint8 (N, H, W, 3) and labels (N,)."""

    def __init__(self, dataset: Dataset, desc: str = "loading images"):
        n = len(dataset)
        first, _ = dataset[0]
        self.images = np.empty((n, *first.shape), dtype=np.uint8)
        self.labels = np.empty(n, dtype=np.int64)
        self.num_classes = len(dataset.classes)
        for i in tqdm(range(n), desc=desc, unit="img", dynamic_ncols=True):
            self.images[i], self.labels[i] = dataset[i]

    def __len__(self) -> int:
        return len(self.labels)



class ProceduralShapes:
    """Deterministic synthetic images: shapes of one kind per class on smooth backgrounds.

    Image ``i`` of seed ``s`` is always the same picture, so train/held-out splits are just
    disjoint seeds. Shapes are drawn at 4x and down-sampled, giving clean, real edges.
    """

    classes = SHAPES

    def __init__(self, size: int = 4096, resolution: int = 64, seed: int = 0):
        self.size, self.resolution, self.seed = size, resolution, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        label = int(rng.integers(len(SHAPES)))
        return render_shapes(rng, SHAPES[label], self.resolution), label


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(lo, hi, 3))


def render_shapes(rng: np.random.Generator, kind: str, resolution: int) -> np.ndarray:
    """One picture of 1-3 ``kind`` shapes over a two-colour gradient, as uint8 (H, W, 3)."""
    S = resolution * 4
    theta = float(rng.uniform(0, 2 * math.pi))
    yy, xx = np.mgrid[0:S, 0:S] / (S - 1)
    t = xx * math.cos(theta) + yy * math.sin(theta)
    t = ((t - t.min()) / (t.max() - t.min()))[..., None]
    a, b = np.array(_color(rng, 0, 120)), np.array(_color(rng, 60, 200))
    img = Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        r = float(rng.uniform(0.12, 0.3)) * S
        cx, cy = (float(v) for v in rng.uniform(r, S - r, 2))
        _draw_shape(draw, kind, cx, cy, r, float(rng.uniform(0, math.pi)), _color(rng, 140, 256), rng)
    img = img.filter(ImageFilter.GaussianBlur(1.0)).resize((resolution, resolution), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def _poly(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
            for k in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float,
                fill: tuple[int, int, int], rng: np.random.Generator) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.polygon(_poly(cx, cy, r, 4, angle), fill=fill)
    elif kind == "triangle":
        draw.polygon(_poly(cx, cy, r, 3, angle), fill=fill)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r * 0.35)))
    elif kind == "cross":
        w = r * 0.35
        for dx, dy in ((r, w), (w, r)):
            draw.rectangle((cx - dx, cy - dy, cx + dx, cy + dy), fill=fill)
    elif kind == "diamond":
        draw.polygon(_poly(cx, cy, r, 4, 0.0), fill=fill)
    elif kind == "ellipse":
        draw.ellipse((cx - r, cy - r * 0.55, cx + r, cy + r * 0.55), fill=fill)
    elif kind == "bars":
        w = r / 5
        for k in range(-2, 3, 2):
            draw.rectangle((cx + k * w - w / 2, cy - r, cx + k * w + w / 2, cy + r), fill=fill)
    else:
        raise ValueError(kind)
