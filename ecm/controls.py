"""Control maps: how a condition image is made from (or paired with) a training image.

Built in: ``canny`` (OpenCV Canny, thresholds 100 / 200 at the model's resolution, the field's
convention). Maps made by any other tool come from a folder: ``folder:<name>``. A new extractor
is a function from a uint8 RGB image to a uint8 map, registered under a name::

    from ecm.controls import register_control

    @register_control("sobel")
    def sobel(img_HW3):
        ...  # return uint8 (H, W) or (H, W, 3)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ecm.runtime.errors import ECMError
from ecm.runtime.images import IMAGE_SUFFIXES, canny_edges, preprocess, to_rgb_map

Extractor = Callable[[np.ndarray], np.ndarray]
EXTRACTORS: dict[str, Extractor] = {}


def register_control(name: str) -> Callable[[Extractor], Extractor]:
    """Register ``fn(img_HW3_uint8) -> map_uint8`` as control type ``name``."""

    def wrap(fn: Extractor) -> Extractor:
        EXTRACTORS[name] = fn
        return fn

    return wrap


register_control("canny")(canny_edges)


@dataclass
class Control:
    """A control type: an extractor, or maps read from a folder paired with images by stem."""

    spec: str
    folder: Path | None = None
    resolution: int = 256
    canny_low: int = 100
    canny_high: int = 200
    _index: dict[str, Path] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        kind, _, name = self.spec.partition(":")
        if kind == "folder":
            if not name:
                raise ECMError("--control folder:<name> needs a name, e.g. folder:depth")
            if self.folder is None:
                raise ECMError(f"--control {self.spec} needs --control-dir with the folder of maps")
            if not Path(self.folder).is_dir():
                raise ECMError(f"control folder {self.folder} for {self.spec!r} does not exist; "
                               "pass --control-dir with the folder of maps")
            self._index = {p.stem: p for p in Path(self.folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
        elif self.spec not in EXTRACTORS:
            known = ", ".join([*sorted(EXTRACTORS), "folder:<name>"])
            raise ECMError(f"unknown control type {self.spec!r}; choose one of {known}")
        if not 0 <= self.canny_low <= self.canny_high:
            raise ECMError(f"Canny thresholds {self.canny_low} / {self.canny_high} must satisfy 0 <= low <= high")

    @property
    def from_folder(self) -> bool:
        return self.spec.startswith("folder:")

    def check_pairs(self, image_paths: list[Path]) -> None:
        """Every image needs a readable map: report the missing and unreadable ones by name, with counts."""
        if not self.from_folder:
            return
        missing = [p.name for p in image_paths if p.stem not in self._index]
        if missing:
            raise ECMError(f"{len(missing)} of {len(image_paths)} images have no control map in "
                           f"{self.folder} (matched by file stem): {_names(missing)}")
        unreadable = []
        for p in image_paths:
            try:
                with Image.open(self._index[p.stem]) as m:
                    m.verify()
            except Exception:  # PIL raises many types for a bad file
                unreadable.append(self._index[p.stem].name)
        if unreadable:
            raise ECMError(f"{len(unreadable)} of {len(image_paths)} control maps in {self.folder} cannot be read: "
                           f"{_names(unreadable)}; replace them")

    def __call__(self, img_HW3: np.ndarray, path: Path | None = None) -> np.ndarray:
        """The control map of one image as uint8 (H, W, 3)."""
        if self.from_folder:
            if path is None or path.stem not in self._index:
                raise ECMError(f"no control map for {path} in {self.folder}")
            map_path = self._index[path.stem]
            try:
                with Image.open(map_path) as m:
                    out = preprocess(m, self.resolution)
            except OSError as e:
                raise ECMError(f"cannot read control map {map_path} ({e}); replace it") from None
        elif self.spec == "canny":
            out = canny_edges(img_HW3, self.canny_low, self.canny_high)
        else:
            out = EXTRACTORS[self.spec](img_HW3)
        return to_rgb_map(out) if out.ndim == 2 else out


def _names(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")
