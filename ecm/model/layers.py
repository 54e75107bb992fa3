"""The attention and feed-forward layers that VAR's blocks and ECM's adapters share, with explicit sizes.

Attention is plain MatMul + Softmax (what every runtime and TensorRT 10.3 parse), on L2-normalised
q and k with a learned per-head temperature, as in the official VAR; parameter names are the
official ones so that released checkpoints load strictly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ecm.model.kv_cache import KVCache

#: A callback run after backbone block i on its hidden state: where control adapters (ECM) add theirs.
Injector = Callable[[int, torch.Tensor], torch.Tensor]


def attend(q_BHlc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor,
           attn_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention with scale 1 (q and k are L2-normalised), as plain MatMul + Softmax."""
    scores = q_BHlc @ k_BHLc.transpose(-2, -1)
    if attn_bias is not None:
        scores = scores + attn_bias
    return scores.softmax(dim=-1) @ v_BHLc


class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q, k and a learned per-head temperature."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        C, H = embed_dim, num_heads
        self.num_heads, self.head_dim = H, C // H
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
        self.max_scale_mul = math.log(100)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def qkv(self, x_BlC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project to heads: q (scaled), k (unit length) and v, each (B, H, l, c)."""
        B, l, _ = x_BlC.shape
        w = self.mat_qkv.weight  # fp16 in fp16 exports: the matmul runs in its precision, the rest in fp32
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)).to(w.dtype)
        qkv = F.linear(x_BlC.to(w.dtype), w, bias).to(x_BlC.dtype).view(B, l, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        return F.normalize(q, dim=-1) * scale_mul, F.normalize(k, dim=-1), v

    def forward(self, x_BlC: torch.Tensor, attn_bias: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, l, C = x_BlC.shape
        q, k, v = self.qkv(x_BlC)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return self.proj(attend(q, k, v, attn_bias).transpose(1, 2).reshape(B, l, C))


class FFN(nn.Module):
    """Linear -> GELU (tanh) -> Linear."""

    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
