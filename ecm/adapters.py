"""ECM: a small control encoder and a few adapter blocks that steer a frozen VAR.

The control image is encoded once (a ViT whose token grid is the last scale's), area-sampled to
every scale and projected to the backbone width. Adapter j runs after backbone block
``positions[j]``: it adds the control tokens of the current scale to the hidden state, refines
them with its own block-causal attention (own KV cache), then a feed-forward network shared by
all adapters, scaled by a per-adapter gate. Gates start at zero, so a fresh ECM leaves the
backbone's output exactly unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ecm import resample
from ecm.config import VARConfig
from ecm.kv_cache import KVCache
from ecm.runtime.errors import ConfigError
from ecm.runtime.scales import begin_ends
from ecm.var import FFN, SelfAttention, attend


@dataclass(frozen=True)
class ECMConfig:
    """Adapter sizes plus the backbone facts they were built for (checked when loading)."""

    num_adapters: int = 4
    enc_width: int = 256
    enc_depth: int = 4
    enc_heads: int = 4
    ffn_ratio: float = 2.0
    control: str = "canny"
    canny_low: int = 100
    canny_high: int = 200
    # backbone facts
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    patch_size: int = 16  # control-encoder patch = the VQVAE down-sampling factor

    def __post_init__(self) -> None:
        if not 1 <= self.num_adapters <= self.depth:
            raise ConfigError(f"ECM needs 1..{self.depth} adapters for a depth-{self.depth} backbone, "
                              f"not {self.num_adapters}; pass fewer adapters")

    @property
    def positions(self) -> tuple[int, ...]:
        """Backbone block after which each adapter runs: spread evenly over the depth."""
        n = self.num_adapters
        return tuple((j + 1) * self.depth // (n + 1) for j in range(n))


ECM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_adapters=2, enc_width=128, enc_depth=2, enc_heads=2, ffn_ratio=2.0),
    "base": dict(num_adapters=4, enc_width=256, enc_depth=4, enc_heads=4, ffn_ratio=2.0),
}


def ecm_config(backbone: VARConfig, patch_size: int, preset: str | None = None, **overrides: Any) -> ECMConfig:
    """An ECM preset fitted to a backbone (``tiny`` for backbones narrower than 512, else ``base``)."""
    preset = preset or ("tiny" if backbone.embed_dim < 512 else "base")
    if preset not in ECM_PRESETS:
        raise ConfigError(f"unknown ECM preset {preset!r}; choose one of {', '.join(ECM_PRESETS)}")
    facts = dict(depth=backbone.depth, embed_dim=backbone.embed_dim, num_heads=backbone.num_heads,
                 patch_nums=tuple(backbone.patch_nums), patch_size=patch_size)
    return ECMConfig(**{**ECM_PRESETS[preset], **facts, **overrides})


class EncoderBlock(nn.Module):
    """Pre-LN ViT block with full (non-causal) attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = FFN(width, 4 * width)

    def forward(self, x_BNW: torch.Tensor) -> torch.Tensor:
        B, N, W = x_BNW.shape
        q, k, v = self.qkv(self.ln1(x_BNW)).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = attend(q * (W // self.heads) ** -0.5, k, v).transpose(1, 2).reshape(B, N, W)
        x_BNW = x_BNW + self.proj(a)
        return x_BNW + self.mlp(self.ln2(x_BNW))


class ControlEncoder(nn.Module):
    """ViT over the control image: (B, 3, H, W) in [-1, 1] -> features (B, W, HW, HW)."""

    def __init__(self, cfg: ECMConfig):
        super().__init__()
        W, hw = cfg.enc_width, cfg.patch_nums[-1]
        self.patch_embed = nn.Conv2d(3, W, cfg.patch_size, stride=cfg.patch_size)
        self.pos_1NW = nn.Parameter(torch.randn(1, hw * hw, W) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(W, cfg.enc_heads) for _ in range(cfg.enc_depth))
        self.norm = nn.LayerNorm(W)

    def forward(self, ctrl_B3HW: torch.Tensor) -> torch.Tensor:
        f_BWhw = self.patch_embed(ctrl_B3HW)
        B, W, h, w = f_BWhw.shape
        x_BNW = f_BWhw.flatten(2).transpose(1, 2) + self.pos_1NW
        for block in self.blocks:
            x_BNW = block(x_BNW)
        return self.norm(x_BNW).transpose(1, 2).reshape(B, W, h, w)


class AdapterBlock(nn.Module):
    """Fuse control tokens by addition, then block-causal attention with its own cache."""

    def __init__(self, cfg: ECMConfig):
        super().__init__()
        var_like = VARConfig(depth=1, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads)
        self.ln1 = nn.LayerNorm(cfg.embed_dim)
        self.attn = SelfAttention(var_like)
        self.ln2 = nn.LayerNorm(cfg.embed_dim)

    def forward(self, h_BlC: torch.Tensor, ctrl_BlC: torch.Tensor, attn_bias: torch.Tensor | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        x_BlC = h_BlC + ctrl_BlC
        return x_BlC + self.attn(self.ln1(x_BlC), attn_bias, cache, layer)


Injector = Callable[[int, torch.Tensor], torch.Tensor]


class ECM(nn.Module):
    """The trainable control module: encoder, adapters, one shared FFN, a gate per adapter."""

    def __init__(self, cfg: ECMConfig):
        super().__init__()
        self.config = cfg
        C = cfg.embed_dim
        self.begin_ends = begin_ends(cfg.patch_nums)
        self.encoder = ControlEncoder(cfg)
        self.ctrl_proj = nn.Linear(cfg.enc_width, C)
        self.adapters = nn.ModuleList(AdapterBlock(cfg) for _ in range(cfg.num_adapters))
        self.shared_ffn = FFN(C, round(C * cfg.ffn_ratio))
        self.gates = nn.Parameter(torch.zeros(cfg.num_adapters, C))
        self._slot = {p: j for j, p in enumerate(cfg.positions)}

    def control_tokens(self, ctrl_B3HW: torch.Tensor, keep_B: torch.Tensor | None = None,
                       num_scales: int | None = None) -> torch.Tensor:
        """Control tokens of every scale (or the first ``num_scales``), (B, L, C).

        Rows with ``keep_B == 0`` get none (control dropout).
        """
        f_BWhw = self.encoder(ctrl_B3HW)
        patch_nums = self.config.patch_nums[:num_scales]
        per_scale = [resample.area(f_BWhw, pn).flatten(2).transpose(1, 2) for pn in patch_nums]
        ctrl_BLC = self.ctrl_proj(torch.cat(per_scale, dim=1))
        if keep_B is not None:
            ctrl_BLC = ctrl_BLC * keep_B.view(-1, 1, 1).to(ctrl_BLC.dtype)
        return ctrl_BLC

    def adapt(self, j: int, h_BlC: torch.Tensor, ctrl_BlC: torch.Tensor, attn_bias: torch.Tensor | None = None,
              cache: KVCache | None = None) -> torch.Tensor:
        """Adapter j's contribution added to the hidden state."""
        x_BlC = self.adapters[j](h_BlC, ctrl_BlC, attn_bias, cache, j)
        return h_BlC + self.shared_ffn(self.adapters[j].ln2(x_BlC)) * self.gates[j]

    def injector(self, ctrl_BlC: torch.Tensor, attn_bias: torch.Tensor | None = None,
                 cache: KVCache | None = None) -> Injector:
        """A callback for ``VAR.run_blocks``: after block i, run the adapter placed there (if any)."""

        def inject(i: int, h_BlC: torch.Tensor) -> torch.Tensor:
            j = self._slot.get(i)
            return h_BlC if j is None else self.adapt(j, h_BlC, ctrl_BlC, attn_bias, cache)

        return inject

    def new_cache(self, batch: int, dtype: torch.dtype = torch.float32) -> KVCache:
        """The adapters' own KV cache for ``batch`` rows over all L positions."""
        cfg = self.config
        L = self.begin_ends[-1][1]
        return KVCache(cfg.num_adapters, batch, cfg.num_heads, L, cfg.embed_dim // cfg.num_heads,
                       self.gates.device, dtype)

    def start(self, ctrl_B3HW: torch.Tensor, cfg_rows: bool = True) -> ControlState:
        """Per-image state for generation; with CFG the unconditional rows get no control."""
        ctrl_BLC = self.control_tokens(ctrl_B3HW)
        if cfg_rows:
            ctrl_BLC = torch.cat((ctrl_BLC, torch.zeros_like(ctrl_BLC)))
        return ControlState(self, ctrl_BLC, self.new_cache(ctrl_BLC.shape[0]))

    def check_backbone(self, backbone: VARConfig) -> None:
        """Refuse a backbone of another shape than the one these adapters were trained on."""
        cfg = self.config
        got = (backbone.depth, backbone.embed_dim, backbone.num_heads, tuple(backbone.patch_nums))
        want = (cfg.depth, cfg.embed_dim, cfg.num_heads, tuple(cfg.patch_nums))
        if got != want:
            raise ConfigError(f"ECM adapters were built for a backbone with (depth, width, heads, scales) = "
                              f"{want}, not {got}; load the backbone they were trained on")


@dataclass
class ControlState:
    """The control of one generation: tokens of all scales and the adapters' KV cache."""

    ecm: ECM
    ctrl_BLC: torch.Tensor
    cache: KVCache

    def injector(self, si: int) -> Injector:
        """The adapters' callback for scale si (its control tokens, the shared cache)."""
        b, e = self.ecm.begin_ends[si]
        return self.ecm.injector(self.ctrl_BLC[:, b:e], None, self.cache)

    def advance(self, num_tokens: int) -> None:
        """Mark the scale's tokens as cached, after the step ran."""
        self.cache.advance(num_tokens)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())

