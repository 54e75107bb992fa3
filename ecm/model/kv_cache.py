"""A preallocated key/value cache with a fill level, so that every scale runs on static shapes."""

from __future__ import annotations

import torch


class KVCache:
    """K and V of ``num_layers`` attention layers for all L positions; the first ``fill`` are valid.

    A scale writes its new keys and values at ``[fill, fill + l)`` of each layer, attends to
    ``[0, fill + l)``, and :meth:`advance` moves the fill level once all layers have run.
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, length: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (num_layers, batch, num_heads, length, head_dim)
        self.k_NBHLc = torch.zeros(shape, device=device, dtype=dtype)
        self.v_NBHLc = torch.zeros(shape, device=device, dtype=dtype)
        self.fill = 0

    @property
    def length(self) -> int:
        return self.k_NBHLc.shape[3]

    def update(self, layer: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this scale's K/V for ``layer``; return all valid K/V including them."""
        end = self.fill + k_BHlc.shape[2]
        if end > self.length:
            raise ValueError(f"KV cache overflow: {end} tokens > {self.length} allocated")
        self.k_NBHLc[layer, :, :, self.fill:end] = k_BHlc
        self.v_NBHLc[layer, :, :, self.fill:end] = v_BHlc
        return self.k_NBHLc[layer, :, :, :end], self.v_NBHLc[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Mark ``num_tokens`` more positions as filled (after every layer has run the scale)."""
        self.fill += num_tokens

    def reset(self) -> None:
        """Start a new image: forget all tokens, keep the buffers."""
        self.fill = 0

    @property
    def nbytes(self) -> int:
        return self.k_NBHLc.numel() * self.k_NBHLc.element_size() * 2
