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
from collections.abc import Sequence
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

    def delta(self, j: int, h_BlC: torch.Tensor, ctrl_BlD: torch.Tensor, attn_bias: torch.Tensor | None = None,
              cache: KVCache | None = None, layer: int | None = None) -> torch.Tensor:
        """What adapter j adds to the hidden state (gates folded into ``up`` at export: None). ``layer`` is its
        slot in ``cache`` (j unless several controls share one cache)."""
        adapter = self.adapters[j]
        x_BlD = adapter(h_BlC, ctrl_BlD, attn_bias, cache, j if layer is None else layer)
        out_BlC = adapter.up(self.shared_ffn(adapter.ln2(x_BlD)))
        return out_BlC if self.gates is None else out_BlC * self.gates[j]

    def adapt(self, j: int, h_BlC: torch.Tensor, ctrl_BlD: torch.Tensor, attn_bias: torch.Tensor | None = None,
              cache: KVCache | None = None) -> torch.Tensor:
        """The hidden state with adapter j's contribution added (teacher forcing, one control)."""
        return h_BlC + self.delta(j, h_BlC, ctrl_BlD, attn_bias, cache)

    def injector(self, ctrl_BlD: torch.Tensor, attn_bias: torch.Tensor | None = None,
                 cache: KVCache | None = None) -> Injector:
        """A callback for ``VAR.run_blocks``: after block i, run the adapter placed there (if any)."""

        def inject(i: int, h_BlC: torch.Tensor) -> torch.Tensor:
            j = self._slot.get(i)
            return h_BlC if j is None else self.adapt(j, h_BlC, ctrl_BlD, attn_bias, cache)

        return inject

    def slot(self, block: int) -> int | None:
        """The adapter that runs after backbone block ``block``, if any."""
        return self._slot.get(block)

    def start(self, ctrl_B3HW: torch.Tensor, cfg_rows: bool = True) -> MixState:
        """Per-image state for generation with this control alone (weight 1); see :meth:`ControlMix.start`."""
        return ControlMix([self]).start([ctrl_B3HW], cfg_rows)

    def check_backbone(self, backbone: VARConfig) -> None:
        """Refuse a backbone of another shape than the one these adapters were trained on."""
        cfg = self.config
        got = (backbone.depth, backbone.embed_dim, backbone.num_heads, tuple(backbone.patch_nums))
        want = (cfg.depth, cfg.embed_dim, cfg.num_heads, tuple(cfg.patch_nums))
        if got != want:
            raise ConfigError(f"ECM adapters were built for a backbone with (depth, width, heads, scales) = "
                              f"{want}, not {got}; load the backbone they were trained on")


class ControlMix:
    """Adapter sets trained separately on one backbone, steering it together (eager generation and export).

    After backbone block i, every control with an adapter there adds its contribution times its
    weight, all computed from the same hidden state. Their adapters share one KV cache, one control's
    layers after the other's, so they must share a width and head count. A weight of 0 (and no
    condition) turns a control off exactly; one control at weight 1 is ECM's own result.
    """

    def __init__(self, ecms: Sequence[ECM], weights: Sequence[float] | None = None):
        self.ecms = list(ecms)
        if not self.ecms:
            raise ConfigError("a control mix needs at least one ECM adapter set")
        names = self.names
        if len(set(names)) != len(names):
            raise ConfigError(f"two adapter sets follow the same control ({', '.join(names)}); pass each control once")
        shapes = {(e.config.width, e.config.heads) for e in self.ecms}
        if len(shapes) > 1:
            raise ConfigError(f"adapter sets of different widths and heads ({sorted(shapes)}) cannot share one "
                              "step: train them with the same --preset")
        self.offsets = [sum(e.config.num_adapters for e in self.ecms[:k]) for k in range(len(self.ecms))]
        self.weights = torch.tensor([1.0] * len(self.ecms) if weights is None else [float(w) for w in weights])
        if self.weights.shape != (len(self.ecms),):
            raise ConfigError(f"{self.weights.numel()} control weights for {len(self.ecms)} controls")

    @property
    def names(self) -> list[str]:
        """The control type of each adapter set, in order."""
        return [e.config.control for e in self.ecms]

    @property
    def num_layers(self) -> int:
        """Layers of the shared adapter cache: every set's adapters."""
        return sum(e.config.num_adapters for e in self.ecms)

    def injector(self, ctrls_BlD: Sequence[torch.Tensor], weights_K: torch.Tensor,
                 cache: KVCache | None = None) -> Injector:
        """A callback for ``VAR.run_blocks``: after block i, add each control's weighted adapter output."""

        def inject(i: int, h_BlC: torch.Tensor) -> torch.Tensor:
            out_BlC = h_BlC
            for k, ecm in enumerate(self.ecms):
                j = ecm.slot(i)
                if j is not None:
                    delta_BlC = ecm.delta(j, h_BlC, ctrls_BlD[k], None, cache, self.offsets[k] + j)
                    out_BlC = out_BlC + weights_K[k] * delta_BlC
            return out_BlC

        return inject

    def start(self, ctrls_B3HW: torch.Tensor | Sequence[torch.Tensor | None], cfg_rows: bool = True) -> MixState:
        """Per-generation state: each control's tokens, its weight, CFG's unconditional rows without control,
        and the shared cache. One image per control (None: that control is off, weight 0), or a single
        tensor for the first control alone, as a condition without a control name is taken at run time."""
        if isinstance(ctrls_B3HW, torch.Tensor):
            ctrls_B3HW = [ctrls_B3HW] + [None] * (len(self.ecms) - 1)
        if len(ctrls_B3HW) != len(self.ecms):
            raise ConfigError(f"{len(ctrls_B3HW)} control images for {len(self.ecms)} controls "
                              f"({', '.join(self.names)})")
        given = [c for c in ctrls_B3HW if c is not None]
        if not given:
            raise ConfigError(f"no control image for any of {', '.join(self.names)}")
        first = self.ecms[0].ctrl_proj.weight
        B, L = given[0].shape[0], self.ecms[0].begin_ends[-1][1]
        tokens = []
        for ecm, ctrl in zip(self.ecms, ctrls_B3HW):
            ctrl_BLD = (ecm.control_tokens(ctrl.to(first.device)) if ctrl is not None
                        else first.new_zeros(B, L, ecm.config.width))
            tokens.append(torch.cat((ctrl_BLD, torch.zeros_like(ctrl_BLD))) if cfg_rows else ctrl_BLD)
        on_K = torch.tensor([c is not None for c in ctrls_B3HW], dtype=self.weights.dtype)
        e = self.ecms[0].config
        cache = KVCache(self.num_layers, tokens[0].shape[0], e.heads, L, e.width // e.heads, first.device)
        return MixState(self, tokens, (self.weights * on_K).to(first.device), cache)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every set's weights, keyed by position and name: what identifies the mix."""
        return {f"ecm{k}.{n}": v for k, e in enumerate(self.ecms) for n, v in e.state_dict().items()}


def as_mix(adapters: ECM | ControlMix | None) -> ControlMix | None:
    """One adapter set as a mix of one; a mix or None as it is."""
    return ControlMix([adapters]) if isinstance(adapters, ECM) else adapters


@dataclass
class MixState:
    """The control of one generation: each set's tokens of all scales, the weights and the shared cache."""

    mix: ControlMix
    ctrls_BLD: list[torch.Tensor]
    weights_K: torch.Tensor
    cache: KVCache

    def injector(self, si: int) -> Injector:
        """The adapters' callback for scale si."""
        b, e = self.mix.ecms[0].begin_ends[si]
        return self.mix.injector([c[:, b:e] for c in self.ctrls_BLD], self.weights_K, self.cache)

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
