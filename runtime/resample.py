"""Resampling matrices: area down-sampling and bicubic up-sampling as ``Y = P X P^T``.

They equal ``F.interpolate(mode='area')`` and ``F.interpolate(mode='bicubic', align_corners=False)``
(a = -0.75, taps clamped at the border) exactly, up to float rounding. The matrix form exports to
plain MatMul and runs the same in every runtime. NumPy only: the model, the exported graphs
(which take them as inputs) and the runtime (which uploads them) share these.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

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
