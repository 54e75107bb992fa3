"""Held-out samples for ``ecm-eval``, read a batch at a time: the procedural set, an image folder or a cache.

However large the source, evaluation holds one batch: ``n`` samples spread evenly over it (a
sorted ImageNet folder would otherwise give ``n`` images of its first classes), read when their
batch is scored. A cache gives conditions, labels and the VQVAE's tokens (the reconstruction
ceiling decodes them); its source images, where they are still on disk, give the ground truth.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecm.data.cache import TokenCache
from ecm.data.controls import Control
from ecm.data.datasets import HELD_OUT_SEED, ImageFolder, ProceduralShapes
from ecm.runtime.images import preprocess, read_image

#: What a held-out set reads for a batch: conditions, labels, images or None, tokens or None.
Samples = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


@dataclass
class HeldOutBatch:
    """Samples ``start`` .. of the held-out set: conditions and labels, with their images or tokens or both."""

    start: int
    conds_BHW3: np.ndarray
    labels_B: np.ndarray
    images_BHW3: np.ndarray | None = None
    tokens_BL: np.ndarray | None = None


class HeldOut:
    """``n`` held-out samples, read in batches by :meth:`batches`."""

    def __init__(self, indices: np.ndarray):
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, idx: np.ndarray) -> Samples:
        """(conditions, labels, images or None, tokens or None) of the samples ``idx``."""
        raise NotImplementedError

    def batches(self, size: int) -> Iterator[HeldOutBatch]:
        for b in range(0, len(self), size):
            yield HeldOutBatch(b, *self.read(self.indices[b:b + size]))


def spread(n: int, total: int) -> np.ndarray:
    """``min(n, total)`` indices spread evenly over 0 .. total - 1."""
    return np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(np.int64))


class ProceduralHeldOut(HeldOut):
    """The first ``n`` images of the held-out procedural seed and their extracted conditions."""

    def __init__(self, n: int, control: Control):
        super().__init__(np.arange(n))
        self.ds, self.control = ProceduralShapes(n, control.resolution, HELD_OUT_SEED), control

    def read(self, idx: np.ndarray) -> Samples:
        images, labels = zip(*(self.ds[int(i)] for i in idx))
        return np.stack([self.control(im) for im in images]), np.array(labels), np.stack(images), None


class FolderHeldOut(HeldOut):
    """Images of a folder; their conditions extracted, or read from the control's folder of maps."""

    def __init__(self, folder: Path, n: int, control: Control):
        self.folder, self.control = ImageFolder(folder, control.resolution), control
        super().__init__(spread(n, len(self.folder)))
        control.check_pairs([self.folder.items[int(i)][0] for i in self.indices])

    def read(self, idx: np.ndarray) -> Samples:
        images, labels = zip(*(self.folder[int(i)] for i in idx))
        conds = [self.control(im, self.folder.items[int(i)][0]) for im, i in zip(images, idx)]
        return np.stack(conds), np.array(labels), np.stack(images), None


class CacheHeldOut(HeldOut):
    """Samples of a cache: conditions, labels and tokens; the images too while its source folder has them."""

    def __init__(self, cache: TokenCache, n: int):
        super().__init__(spread(n, len(cache)))
        self.cache = cache
        root, files = Path(cache.info.source), cache.source_files()
        got = cache.read(self.indices[:1])
        self.sources = [root / f for f in files] if (root / files[int(got.items_B[0])]).is_file() else None

    def read(self, idx: np.ndarray) -> Samples:
        got = self.cache.read(idx)
        images = None
        if self.sources is not None:
            images = np.stack([preprocess(read_image(self.sources[int(i)], "image"), self.cache.resolution)
                               for i in got.items_B])
        return got.maps_BHW3, got.labels_B, images, got.tokens_BL
