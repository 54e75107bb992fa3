"""ECM: a small control encoder and a few bottleneck adapters that steer a frozen VAR.

The control image is encoded once (a ViT whose token grid is the last scale's), area-sampled to
every scale and projected to the adapters' width D (a quarter of the backbone's by default).
Adapter j runs after backbone block ``positions[j]``: it projects the hidden state down to D,
adds the control tokens of the current scale, refines them with its own block-causal attention
(own KV cache), runs a feed-forward network shared by all adapters, and projects back up, scaled
by a per-adapter gate. Gates start at zero, so a fresh ECM leaves the backbone's output exactly
unchanged. Working at D = C/4 keeps an adapter's cost near 1/12 of a backbone block's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ecm.model import interpolate
from ecm.model.checkpoint import config_from_meta, read_checkpoint, save_safetensors, tensor_hash
from ecm.model.config import VARConfig, config_to_dict
from ecm.model.kv_cache import KVCache
from ecm.model.layers import FFN, Injector, SelfAttention, attend
from ecm.runtime.errors import CheckpointError, ConfigError
from ecm.runtime.scales import begin_ends


@dataclass(frozen=True)
class ECMConfig:
    """Adapter sizes plus the backbone facts they were built for (checked when loading)."""

    num_adapters: int = 4
    adapter_dim: int = 0  # width the adapters work at; 0: a quarter of the backbone's
    adapter_heads: int = 0  # attention heads of an adapter; 0: about one per 64 channels (a divisor of the width)
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
        if self.width % self.heads:
            raise ConfigError(f"{self.heads} adapter heads do not divide the adapters' width {self.width}; "
                              "pass a divisor of it as adapter_heads")

    @property
    def width(self) -> int:
        """D, the adapters' width."""
        return self.adapter_dim or max(self.embed_dim // 4, 1)

    @property
    def heads(self) -> int:
        """Attention heads of an adapter: as asked, else the divisor of the width nearest one per 64 channels
        (d30's 480 channels: 8 heads of 60)."""
        if self.adapter_heads:
            return self.adapter_heads
        divisors = [h for h in range(1, self.width + 1) if self.width % h == 0]
        return min(divisors, key=lambda h: (abs(h - self.width / 64), -h))

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
    """Down-project, fuse the control tokens by addition, block-causal attention with its own cache.

    The shared FFN and this adapter's ``up`` projection follow in :meth:`ECM.adapt`.
    """

    def __init__(self, cfg: ECMConfig):
        super().__init__()
        D = cfg.width
        self.down = nn.Linear(cfg.embed_dim, D)
        self.ln1 = nn.LayerNorm(D)
        self.attn = SelfAttention(D, cfg.heads)
        self.ln2 = nn.LayerNorm(D)
        self.up = nn.Linear(D, cfg.embed_dim)

    def forward(self, h_BlC: torch.Tensor, ctrl_BlD: torch.Tensor, attn_bias: torch.Tensor | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        x_BlD = self.down(h_BlC) + ctrl_BlD
        return x_BlD + self.attn(self.ln1(x_BlD), attn_bias, cache, layer)


class ECM(nn.Module):
    """The trainable control module: encoder, adapters, one shared FFN, a gate per adapter."""

    def __init__(self, cfg: ECMConfig):
        super().__init__()
        self.config = cfg
        D = cfg.width
        self.begin_ends = begin_ends(cfg.patch_nums)
        self.encoder = ControlEncoder(cfg)
        self.ctrl_proj = nn.Linear(cfg.enc_width, D)
        self.adapters = nn.ModuleList(AdapterBlock(cfg) for _ in range(cfg.num_adapters))
        self.shared_ffn = FFN(D, round(D * cfg.ffn_ratio))
        self.gates: nn.Parameter | None = nn.Parameter(torch.zeros(cfg.num_adapters, cfg.embed_dim))
        self._slot = {p: j for j, p in enumerate(cfg.positions)}

    def control_tokens(self, ctrl_B3HW: torch.Tensor, keep_B: torch.Tensor | None = None,
                       num_scales: int | None = None) -> torch.Tensor:
        """Control tokens of every scale (or the first ``num_scales``), (B, L, D).

        Rows with ``keep_B == 0`` get none (control dropout).
        """
        f_BWhw = self.encoder(ctrl_B3HW)
        patch_nums = self.config.patch_nums[:num_scales]
        per_scale = [interpolate.area(f_BWhw, pn).flatten(2).transpose(1, 2) for pn in patch_nums]
        ctrl_BLD = self.ctrl_proj(torch.cat(per_scale, dim=1))
        if keep_B is not None:
            ctrl_BLD = ctrl_BLD * keep_B.view(-1, 1, 1).to(ctrl_BLD.dtype)
        return ctrl_BLD

    def adapt(self, j: int, h_BlC: torch.Tensor, ctrl_BlD: torch.Tensor, attn_bias: torch.Tensor | None = None,
              cache: KVCache | None = None) -> torch.Tensor:
        """Adapter j's contribution added to the hidden state (gates folded into ``up`` at export: None)."""
        adapter = self.adapters[j]
        out_BlC = adapter.up(self.shared_ffn(adapter.ln2(adapter(h_BlC, ctrl_BlD, attn_bias, cache, j))))
        return h_BlC + (out_BlC if self.gates is None else out_BlC * self.gates[j])

    def injector(self, ctrl_BlD: torch.Tensor, attn_bias: torch.Tensor | None = None,
                 cache: KVCache | None = None) -> Injector:
        """A callback for ``VAR.run_blocks``: after block i, run the adapter placed there (if any)."""

        def inject(i: int, h_BlC: torch.Tensor) -> torch.Tensor:
            j = self._slot.get(i)
            return h_BlC if j is None else self.adapt(j, h_BlC, ctrl_BlD, attn_bias, cache)

        return inject

    def new_cache(self, batch: int, dtype: torch.dtype = torch.float32) -> KVCache:
        """The adapters' own KV cache for ``batch`` rows over all L positions."""
        cfg = self.config
        L = self.begin_ends[-1][1]
        return KVCache(cfg.num_adapters, batch, cfg.heads, L, cfg.width // cfg.heads, self.ctrl_proj.weight.device,
                       dtype)

    def start(self, ctrl_B3HW: torch.Tensor, cfg_rows: bool = True) -> ControlState:
        """Per-image state for generation; with CFG the unconditional rows get no control."""
        ctrl_BLD = self.control_tokens(ctrl_B3HW)
        if cfg_rows:
            ctrl_BLD = torch.cat((ctrl_BLD, torch.zeros_like(ctrl_BLD)))
        return ControlState(self, ctrl_BLD, self.new_cache(ctrl_BLD.shape[0]))

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
    ctrl_BLD: torch.Tensor
    cache: KVCache

    def injector(self, si: int) -> Injector:
        """The adapters' callback for scale si (its control tokens, the shared cache)."""
        b, e = self.ecm.begin_ends[si]
        return self.ecm.injector(self.ctrl_BLD[:, b:e], None, self.cache)

    def advance(self, num_tokens: int) -> None:
        """Mark the scale's tokens as cached, after the step ran."""
        self.cache.advance(num_tokens)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())



#: Version of the adapter architecture in checkpoints: 2 = bottleneck adapters (width D, own heads).
ECM_FORMAT = "2"


def save_ecm(ecm: ECM, path: str | Path, backbone_hash: str, control: str, step: int,
             extra: dict[str, Any] | None = None) -> None:
    """Adapter-only checkpoint: weights, config, control type and the backbone's hash (:func:`tensor_hash`)."""
    meta = {"ecm_kind": "ecm", "ecm_format": ECM_FORMAT, "config": json.dumps(config_to_dict(ecm.config)),
            "backbone_hash": backbone_hash, "control": control, "step": str(step),
            **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    save_safetensors(ecm.state_dict(), path, meta)


def load_ecm(path: str | Path, backbone: nn.Module | None = None) -> tuple[ECM, dict[str, str]]:
    """Load adapters; with ``backbone`` (a VAR), refuse one other than the backbone they were trained on."""
    state, meta = read_checkpoint(path)
    if meta.get("ecm_kind") != "ecm":
        raise CheckpointError(f"{path} is not an ECM adapter checkpoint (it holds "
                              f"{meta.get('ecm_kind', 'a plain state dict')}); pass the file ecm-train wrote")
    if meta.get("ecm_format") != ECM_FORMAT:
        raise CheckpointError(f"{path} holds adapters of an earlier ecm (format {meta.get('ecm_format', '1')}, "
                              f"full-width adapters); this version reads format {ECM_FORMAT}: retrain with ecm-train")
    ecm = ECM(config_from_meta(meta, "ecm", ECMConfig))
    try:
        ecm.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError:  # keys or shapes of another config
        raise CheckpointError(f"{path}: adapter weights do not fit their own config; the file is damaged") from None
    if backbone is not None:
        ecm.check_backbone(backbone.config)
        got = tensor_hash(backbone.state_dict())
        if meta.get("backbone_hash") != got:
            raise CheckpointError(f"{path} was trained on backbone {meta.get('backbone_hash')}, but the loaded "
                                  f"backbone is {got}; load the backbone these adapters belong to (--vae, --var)")
    return ecm.eval(), meta
