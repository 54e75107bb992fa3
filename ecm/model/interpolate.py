"""Area down-sampling and bicubic up-sampling of latents with the matrices of ``ecm.runtime.resample``.

The matrix form exports to plain MatMul, runs the same in every runtime, and sidesteps the ONNX
exporter's failure on area sizes that do not divide.
"""

from __future__ import annotations

import torch

from ecm.runtime.resample import area_matrix, bicubic_matrix

__all__ = ["area", "area_matrix", "bicubic", "bicubic_matrix", "separable"]


def _matrix(kind: str, src: int, dst: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Not cached as a tensor: one made while torch.export traces would be a fake tensor.
    P = area_matrix(src, dst) if kind == "area" else bicubic_matrix(src, dst)
    return torch.from_numpy(P).to(device=device, dtype=dtype)


def _resample(kind: str, x_BChw: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x_BChw.shape[-2:]
    if h == size and w == size:
        return x_BChw
    Ph = _matrix(kind, h, size, x_BChw.device, x_BChw.dtype)
    Pw = Ph if w == h else _matrix(kind, w, size, x_BChw.device, x_BChw.dtype)
    return separable(Ph, x_BChw, Pw)


def separable(Ph_dh: torch.Tensor, x_BChw: torch.Tensor, Pw_dw: torch.Tensor | None = None) -> torch.Tensor:
    """Resample the last two dims with matrices: ``Ph X Pw^T`` (Pw defaults to Ph)."""
    return Ph_dh @ x_BChw @ (Ph_dh if Pw_dw is None else Pw_dw).T


def area(x_BChw: torch.Tensor, size: int) -> torch.Tensor:
    """Area down-sampling of the last two dims to ``size x size``."""
    return _resample("area", x_BChw, size)


def bicubic(x_BChw: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic up-sampling of the last two dims to ``size x size``."""
    return _resample("bicubic", x_BChw, size)
