"""Model configurations and presets. The official ones match the released VAR checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ecm.runtime.errors import ConfigError
from ecm.runtime.scales import PATCH_NUMS_256, total_tokens


@dataclass(frozen=True)
class VQVAEConfig:
    """Multi-scale residual VQVAE. Defaults are the official ``vae_ch160v4096z32``."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True
    using_mid_sa: bool = True
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    beta: float = 0.25
    norm_groups: int = 32  # GroupNorm groups; fewer for narrow models, so a group keeps colour contrast

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def resolution(self) -> int:
        """Image side in pixels: the last scale times the down-sampling factor."""
        return self.patch_nums[-1] * self.downsample


@dataclass(frozen=True)
class VARConfig:
    """VAR transformer. ``vocab_size``, ``Cvae`` and ``patch_nums`` must match the VQVAE's."""

    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    norm_eps: float = 1e-6
    cond_drop_rate: float = 0.1
    vocab_size: int = 4096
    Cvae: int = 32
    patch_nums: tuple[int, ...] = field(default=PATCH_NUMS_256)

    @property
    def L(self) -> int:
        return total_tokens(self.patch_nums)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)


VQVAE_PRESETS: dict[str, VQVAEConfig] = {
    "official": VQVAEConfig(),
    # 64 px images, 8x down-sampling to an 8x8 latent, six scales (L = 130): trains on two CPU cores.
    "tiny": VQVAEConfig(
        vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
        patch_nums=(1, 2, 3, 4, 6, 8), norm_groups=8,
    ),
}

VAR_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(depth=4, embed_dim=256, num_heads=4, num_classes=8),
    **{f"d{d}": dict(depth=d, embed_dim=64 * d, num_heads=d) for d in (16, 20, 24, 30)},
}

#: The VQVAE each VAR preset is meant for.
VAR_PRESET_VAE = {"tiny": "tiny", "d16": "official", "d20": "official", "d24": "official", "d30": "official"}


def vqvae_config(preset: str = "official", **overrides: Any) -> VQVAEConfig:
    """A VQVAE preset with any field overridden."""
    if preset not in VQVAE_PRESETS:
        raise ConfigError(f"unknown VQVAE preset {preset!r}; choose one of {', '.join(VQVAE_PRESETS)}")
    return dataclasses.replace(VQVAE_PRESETS[preset], **overrides)


def var_config(preset: str = "d16", vae: VQVAEConfig | None = None, **overrides: Any) -> VARConfig:
    """A VAR preset fitted to ``vae`` (default: the preset's own VQVAE) with overrides."""
    if preset not in VAR_PRESETS:
        raise ConfigError(f"unknown VAR preset {preset!r}; choose one of {', '.join(VAR_PRESETS)}")
    vae = vae or VQVAE_PRESETS[VAR_PRESET_VAE[preset]]
    fitted = dict(vocab_size=vae.vocab_size, Cvae=vae.z_channels, patch_nums=vae.patch_nums)
    return VARConfig(**{**VAR_PRESETS[preset], **fitted, **overrides})


def config_to_dict(cfg: VQVAEConfig | VARConfig) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config from :func:`config_to_dict` output; unknown fields are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {', '.join(unknown)}; the checkpoint is from "
                          "a newer or different toolkit version")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
