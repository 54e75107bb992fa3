"""Images between their file form and the model's: uint8 (N, H, W, 3) and float (N, 3, H, W) tensors.

The exported control encoder and decoder graphs call these too, so a deployed graph converts
pixels exactly as training and evaluation do.
"""

from __future__ import annotations

import numpy as np
import torch


def to_model_range(images_NHW3: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VQVAE's and the control encoder's input."""
    if isinstance(images_NHW3, np.ndarray):
        images_NHW3 = torch.from_numpy(np.ascontiguousarray(images_NHW3))
    return images_NHW3.permute(0, 3, 1, 2).float().div(127.5).sub(1)


def to_pixels(images_B3HW: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (what generation returns) -> uint8 tensor (B, H, W, 3), rounded."""
    return (images_B3HW.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def to_uint8(images_B3HW: torch.Tensor) -> np.ndarray:
    """Float images in [0, 1] -> a uint8 (B, H, W, 3) array, ready to be written as PNG."""
    return to_pixels(images_B3HW).cpu().numpy()
