"""Area down-sampling and bicubic up-sampling as separable matrices: ``Y = P X P^T``.

Both equal ``F.interpolate(mode='area')`` and ``F.interpolate(mode='bicubic', align_corners=False)``
(a = -0.75, taps clamped at the border) exactly, up to float rounding. The matrix form exports to
plain MatMul, runs the same in every runtime, and sidesteps the ONNX exporter's failure on area
sizes that do not divide.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch

_CUBIC_A = -0.75


@cache
def area_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) float64 matrix of adaptive average pooling from ``src`` to ``dst`` samples."""
    P = np.zeros((dst, src))
    for i in range(dst):
        lo = (i * src) // dst
        hi = -((-(i + 1) * src) // dst)  # ceil((i + 1) * src / dst)
        P[i, lo:hi] = 1.0 / (hi - lo)
    return P


def _cubic_weights(t: float) -> tuple[float, float, float, float]:
    """Keys' cubic convolution weights of the four taps at offsets -1, 0, 1, 2 for fraction t."""
    a = _CUBIC_A

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


@cache
def bicubic_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) float64 matrix of bicubic resampling from ``src`` to ``dst`` samples."""
    P = np.zeros((dst, src))
    scale = src / dst
    for i in range(dst):
        x = (i + 0.5) * scale - 0.5  # align_corners=False, not clamped for cubic
        x0 = math.floor(x)
        for off, w in zip((-1, 0, 1, 2), _cubic_weights(x - x0)):
            P[i, min(max(x0 + off, 0), src - 1)] += w
    return P


@cache
def _matrix(kind: str, src: int, dst: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    P = area_matrix(src, dst) if kind == "area" else bicubic_matrix(src, dst)
    return torch.from_numpy(P).to(device=device, dtype=dtype)


def _resample(kind: str, x_BChw: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x_BChw.shape[-2:]
    if h == size and w == size:
        return x_BChw
    Ph = _matrix(kind, h, size, x_BChw.device, x_BChw.dtype)
    Pw = Ph if w == h else _matrix(kind, w, size, x_BChw.device, x_BChw.dtype)
    return Ph @ x_BChw @ Pw.T


def area(x_BChw: torch.Tensor, size: int) -> torch.Tensor:
    """Area down-sampling of the last two dims to ``size x size``."""
    return _resample("area", x_BChw, size)


def bicubic(x_BChw: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic up-sampling of the last two dims to ``size x size``."""
    return _resample("bicubic", x_BChw, size)
