"""Control maps for training: how a condition image is made from (or paired with) a training image.

Control types live in :mod:`ecm.runtime.controls`, shared with the torch-free runtime: ``canny``
built in, more from plug-ins (entry-point group ``ecm.controls``) or :func:`register_control`.
Maps made by any other tool come from a folder (``folder:<name>``), paired with the images by
relative path (``depth/n01440764/x.png`` for ``train/n01440764/x.JPEG``) or, where unique, by stem.
A new extractor takes a few lines::

    from ecm.data.controls import register_control

    @register_control("sobel")
    def sobel(img_HW3):
        ...  # return uint8 (H, W) or (H, W, 3)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ecm.runtime.controls import FOLDER, ControlType, canny_edges, control_type, register_control
from ecm.runtime.errors import ECMError
from ecm.runtime.images import IMAGE_SUFFIXES, preprocess, read_image
from ecm.runtime.manifest import ControlSpec

__all__ = ["Control", "ControlType", "canny_edges", "register_control"]


@dataclass
class Control:
    """A control type as training uses it: an extractor, or maps read from a folder paired with the images."""

    spec: str
    folder: Path | None = None
    resolution: int = 256
    canny_low: int = 100
    canny_high: int = 200
    _index: dict[str, Path] = field(default_factory=dict, repr=False)  # relative path without suffix, stem -> map

    def __post_init__(self) -> None:
        if self.spec.startswith(FOLDER):
            if self.spec == FOLDER:
                raise ECMError("--control folder:<name> needs a name, e.g. folder:depth")
            if self.folder is None:
                raise ECMError(f"--control {self.spec} needs --control-dir with the folder of maps")
            if not Path(self.folder).is_dir():
                raise ECMError(f"control folder {self.folder} for {self.spec!r} does not exist; "
                               "pass --control-dir with the folder of maps")
            self._index = _map_index(Path(self.folder))
        self.kind = control_type(self.spec)
        if not 0 <= self.canny_low <= self.canny_high:
            raise ECMError(f"Canny thresholds {self.canny_low} / {self.canny_high} must satisfy 0 <= low <= high")

    @property
    def from_folder(self) -> bool:
        return self.kind.extractor is None

    @property
    def manifest_spec(self) -> ControlSpec:
        """How the runtime prepares this control's conditions (also what the extractor is told)."""
        return ControlSpec(self.spec, self.resolution, self.canny_low, self.canny_high)

    def map_path(self, image: Path) -> Path | None:
        """The map paired with ``image``: the longest trailing part of its path (suffix dropped) the maps
        folder holds, down to the bare stem."""
        parts = Path(image).with_suffix("").parts
        for k in range(len(parts)):
            found = self._index.get("/".join(parts[k:]))
            if found is not None:
                return found
        return None

    def check_pairs(self, image_paths: list[Path]) -> None:
        """Every image needs a map: report the missing ones by name, with counts (unreadable maps are found
        when they are read)."""
        if not self.from_folder:
            return
        missing = [p.name for p in image_paths if self.map_path(p) is None]
        if missing:
            raise ECMError(f"{len(missing)} of {len(image_paths)} images have no control map in "
                           f"{self.folder} (matched by relative path or file stem): {_names(missing)}")

    def __call__(self, img_HW3: np.ndarray, path: Path | None = None) -> np.ndarray:
        """The control map of one image as uint8 (H, W, 3)."""
        if not self.from_folder:
            return self.kind.extract(img_HW3, self.manifest_spec)
        found = self.map_path(path) if path is not None else None
        if found is None:
            raise ECMError(f"no control map for {path} in {self.folder}")
        return preprocess(read_image(found, "control map"), self.resolution)


def _map_index(folder: Path) -> dict[str, Path]:
    """Maps under ``folder`` by relative path without suffix, and by stem where no two share one."""
    maps = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    index = {p.relative_to(folder).with_suffix("").as_posix(): p for p in maps}
    stems: dict[str, list[Path]] = {}
    for p in maps:
        stems.setdefault(p.stem, []).append(p)
    index.update({stem: ps[0] for stem, ps in stems.items() if len(ps) == 1 and stem not in index})
    return index


def _names(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")
