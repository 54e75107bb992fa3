"""Reduced precision in the graph itself: TensorRT 10.3+ builds strongly typed networks from it.

FP16 here means: the weights of the matrix multiplications and convolutions are stored and run in
fp16, while everything between them stays fp32 - LayerNorm, the L2-normalisation of q and k,
softmax, the residual stream, the vocabulary head and the sampling. The KV cache is stored in fp16.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Cast(nn.Module):
    """A Linear or Conv2d run in its weights' precision inside an fp32 network."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.layer = layer.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.to(self.layer.weight.dtype)).float()


def cast_matmuls(model: nn.Module, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> nn.Module:
    """Make ``model``'s Linear and Conv2d layers run in ``dtype``, in place; returns ``model``.

    Layers whose qualified name starts with one of ``skip`` keep fp32. Only exact nn.Linear and
    nn.Conv2d are cast: subclasses with their own arithmetic (the VQVAE's phi) keep fp32 too.
    """
    for name, m in list(model.named_modules()):
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        if type(m) in (nn.Linear, nn.Conv2d) and not name.startswith(skip) and not isinstance(owner, Cast):
            setattr(owner, attr, Cast(m, dtype))
    return model
