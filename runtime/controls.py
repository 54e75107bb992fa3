"""Control types: how a condition map is made from a picture, and how closely an image follows one.

Built in, each with the fidelity metric of its convention (see :data:`BUILT_IN`): ``canny``
(OpenCV Canny, thresholds 100 / 200 on the image at the model's resolution, the field's
convention; F1 of the edges), ``sketch`` (an XDoG line drawing; F1 of the lines), ``lowres`` (the
image area-down-sampled 4x, shown at full size; PSNR of the generated image down-sampled alike)
and ``grayscale`` (its luminance, for colourisation; PSNR of the generated image's luminance).
More come as plug-ins, the Python way: a package declares an entry point in the group
``ecm.controls`` naming an extractor (uint8 RGB (H, W, 3) -> uint8 map) or a
:class:`ControlType`, and once it is installed every command knows the control by the entry
point's name (``ecm-train``, ``ecm-eval``, export calibration, ``ecm-run --control``).
:func:`register_control` does the same inside one process. Maps made by other tools come from a
folder instead (``folder:<name>``): those controls have no extractor. Torch-free, like the rest
of the runtime, which extracts conditions from photos with these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError, ECMError, first_line

if TYPE_CHECKING:
    from .manifest import ControlSpec

ENTRY_POINTS = "ecm.controls"
FOLDER = "folder:"
Extractor = Callable[[np.ndarray], np.ndarray]


def to_rgb_map(map_: np.ndarray) -> np.ndarray:
    """A grey map (..., H, W) as RGB (..., H, W, 3): how control maps are fed to the model."""
    return np.repeat(map_[..., None], 3, axis=-1)


def canny_edges(img_HW3: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Binary edge map (0 / 255, uint8) of an RGB image: OpenCV Canny on its grey version."""
    try:
        import cv2
    except ImportError:
        raise ECMError("Canny edges need OpenCV: pip install opencv-python-headless") from None
    return cv2.Canny(cv2.cvtColor(np.ascontiguousarray(img_HW3), cv2.COLOR_RGB2GRAY), low, high)


def edge_f1(pred_HW: np.ndarray, target_HW: np.ndarray) -> float:
    """Per-pixel F1 of two binary maps (non-zero = on); 1.0 when both are empty."""
    p, t = pred_HW > 0, target_HW > 0
    if p.sum() + t.sum() == 0:
        return 1.0
    return float(2 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))


#: ``lowres``: the side of the condition is the image's divided by this (64 px -> 16 px, 256 px -> 64 px).
LOWRES_FACTOR = 4
#: ``sketch``: XDoG (Winnemoeller et al. 2012) on the grey image in [0, 1]: lines where G(sigma) - tau G(k sigma)
#: falls below eps. Chosen so that line density matches Canny's on the procedural set and photos (4-12% of pixels).
XDOG_SIGMA, XDOG_K, XDOG_TAU, XDOG_EPS = 0.8, 1.6, 0.98, -0.01
#: PSNR of two identical images: capped, so that means stay finite.
PSNR_CAP = 100.0


def _grey(img_HW3: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luminance of a uint8 RGB image, as float in [0, 255]."""
    return img_HW3.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def luminance(img_HW3: np.ndarray) -> np.ndarray:
    """The ``grayscale`` condition: the image's luminance, uint8 (H, W)."""
    return np.clip(np.round(_grey(img_HW3)), 0, 255).astype(np.uint8)


def lowres(img_HW3: np.ndarray, factor: int = LOWRES_FACTOR) -> np.ndarray:
    """The ``lowres`` condition: the image area-averaged over ``factor`` x ``factor`` blocks and shown at full size
    (each block repeated), uint8 (H, W, 3). Down-sampling it again by area gives the small image back exactly."""
    H, W = img_HW3.shape[:2]
    if H % factor or W % factor:
        raise ECMError(f"lowres needs a resolution divisible by {factor}; got {H} x {W}")
    small = img_HW3.astype(np.float32).reshape(H // factor, factor, W // factor, factor, 3).mean(axis=(1, 3))
    small = np.clip(np.round(small), 0, 255).astype(np.uint8)
    return np.repeat(np.repeat(small, factor, axis=0), factor, axis=1)


def xdog_lines(img_HW3: np.ndarray) -> np.ndarray:
    """The ``sketch`` condition: XDoG lines (255) on black (0), uint8 (H, W)."""
    try:
        import cv2
    except ImportError:
        raise ECMError("sketch lines need OpenCV: pip install opencv-python-headless") from None
    g = _grey(img_HW3) / 255
    d = cv2.GaussianBlur(g, (0, 0), XDOG_SIGMA) - XDOG_TAU * cv2.GaussianBlur(g, (0, 0), XDOG_K * XDOG_SIGMA)
    return np.where(d < XDOG_EPS, 255, 0).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (``PSNR_CAP`` when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * np.log10(255**2 / mse))


def map_rmse(a_HW3: np.ndarray, b_HW3: np.ndarray) -> float:
    """Root mean square difference of two uint8 maps, as a fraction of the full range (0 = equal)."""
    diff = a_HW3.astype(np.float64) - b_HW3.astype(np.float64)
    return float(np.sqrt(np.mean(diff**2)) / 255)


@dataclass(frozen=True)
class ControlType:
    """A kind of condition: its extractor (None for maps from files) and what fidelity means for it.

    ``binary`` controls (edges, lines) take two-valued maps: a condition that is not is refused
    unless asked for, and maps are made two-valued after resizing. Fidelity compares the map
    extracted again from the generated image with the condition: their F1 for binary controls,
    their PSNR for ``psnr`` controls (images made smaller or greyer: the metric of super-resolution
    and colourisation), else their RMSE (lower is better).
    """

    name: str
    extractor: Extractor | None = None
    binary: bool = False
    psnr: bool = False
    map_scale: int = 1  # a map given at 1 / map_scale of the model's size is enlarged by repeating pixels

    @property
    def metric(self) -> str:
        return "F1" if self.binary else "PSNR dB" if self.psnr else "map RMSE"

    @property
    def higher_is_better(self) -> bool:
        return self.binary or self.psnr

    def extract(self, img_HW3: np.ndarray, spec: ControlSpec | None = None) -> np.ndarray:
        """The condition map of a uint8 RGB image at the model's resolution, as uint8 (H, W, 3)."""
        if self.extractor is None:
            raise ECMError(f"maps of {self.name!r} come from another tool, so none can be extracted here; "
                           "pass the map itself")
        out = np.asarray(self.extractor(img_HW3))
        if out.dtype != np.uint8 or out.shape[:2] != img_HW3.shape[:2] or out.ndim not in (2, 3):
            raise ECMError(f"the {self.name!r} extractor returned {out.dtype} {out.shape}; a control extractor "
                           f"must return a uint8 map of {img_HW3.shape[:2]} (grey or RGB)")
        return to_rgb_map(out) if out.ndim == 2 else out

    def score(self, image_HW3: np.ndarray, cond_HW3: np.ndarray, spec: ControlSpec | None = None) -> float:
        """How closely a generated image follows ``cond``: see the class docstring."""
        got = self.extract(image_HW3, spec)
        if self.binary:
            return edge_f1(got[..., 0], cond_HW3[..., 0])
        if self.psnr:
            return psnr(got, cond_HW3)
        return map_rmse(got, cond_HW3)


class Canny(ControlType):
    """OpenCV Canny with the thresholds the model was trained with (100 / 200 unless recorded otherwise)."""

    def __init__(self) -> None:
        super().__init__("canny", canny_edges, binary=True)

    def extract(self, img_HW3: np.ndarray, spec: ControlSpec | None = None) -> np.ndarray:
        low, high = (spec.canny_low, spec.canny_high) if spec is not None else (100, 200)
        return to_rgb_map(canny_edges(img_HW3, low, high))


#: The controls every ecm knows, none of them needing network weights.
BUILT_IN: dict[str, ControlType] = {
    "canny": Canny(),
    "sketch": ControlType("sketch", xdog_lines, binary=True),
    "lowres": ControlType("lowres", lowres, psnr=True, map_scale=LOWRES_FACTOR),
    "grayscale": ControlType("grayscale", luminance, psnr=True),
}
_REGISTRY: dict[str, ControlType] = dict(BUILT_IN)
_plugins: list[str] = []  # entry points loaded so far, by name


def register_control(name: str, *, binary: bool = False) -> Callable[[Extractor], Extractor]:
    """Register ``fn(img_HW3_uint8) -> map_uint8`` as control type ``name`` in this process (a decorator).

    ``binary``: its maps are two-valued (edges, lines, scribbles). A package makes a control known to
    every ``ecm`` command by declaring an entry point in the group ``ecm.controls`` instead.
    """
    if not name or name.startswith(FOLDER) or ":" in name:
        raise ConfigError(f"control name {name!r} is not allowed: use letters, digits, '-' or '_' "
                          f"('{FOLDER}<name>' is for maps from a folder)")

    def wrap(fn: Extractor) -> Extractor:
        _REGISTRY[name] = ControlType(name, fn, binary)
        return fn

    return wrap


def load_plugins() -> None:
    """Register the controls that installed packages declare (entry-point group ``ecm.controls``), once each."""
    for ep in metadata.entry_points(group=ENTRY_POINTS):
        if ep.name in _plugins:
            continue
        _plugins.append(ep.name)
        try:
            obj = ep.load()
        except Exception as e:  # a plug-in's own import error, whatever its type
            raise ECMError(f"the control plug-in {ep.name!r} ({ep.value}) failed to load: "
                           f"{type(e).__name__}: {first_line(e, 160)}; fix or "
                           "uninstall the package that declares it") from None
        if isinstance(obj, ControlType):
            _REGISTRY[ep.name] = obj
        elif callable(obj):
            known = _REGISTRY.get(ep.name)
            if known is None or known.extractor is not obj:  # not registered by the plug-in's own import
                register_control(ep.name)(obj)
        else:
            raise ECMError(f"the control plug-in {ep.name!r} ({ep.value}) is a {type(obj).__name__}, not an "
                           "extractor function or an ecm ControlType; fix the package that declares it")


def control_names() -> list[str]:
    """Every control type known here (plug-ins included), sorted."""
    load_plugins()
    return sorted(_REGISTRY)


def find_control(name: str) -> ControlType | None:
    """The control type ``name`` (``folder:<name>``: maps from files), or None if nothing declares it."""
    if name.startswith(FOLDER) and len(name) > len(FOLDER):
        return ControlType(name)
    if name not in _REGISTRY:
        load_plugins()
    return _REGISTRY.get(name)


def scoring_control(name: str) -> ControlType:
    """The control type whose extractor and metric score conditions of ``name``: itself, or for maps from a
    folder (``folder:<x>``) the control registered as ``x``; a one-line error when there is none."""
    kind = control_type(name)
    if kind.extractor is not None:
        return kind
    base = name[len(FOLDER):]
    found = find_control(base)
    if found is None or found.extractor is None:
        raise ECMError(f"no fidelity metric exists for {name}: its maps come from another tool, so none can be "
                       f"made again from a generated image; register an extractor named {base!r} (register_control "
                       f"or the entry-point group {ENTRY_POINTS}) to score it")
    return found


def control_type(name: str) -> ControlType:
    """The control type ``name``; an unknown name is a one-line error that lists the known ones."""
    found = find_control(name)
    if found is None:
        raise ConfigError(f"unknown control type {name!r}; choose one of {', '.join(control_names())} or "
                          f"{FOLDER}<name> (maps from a folder), or install a package that declares {name!r} in "
                          f"the entry-point group {ENTRY_POINTS}")
    return found
