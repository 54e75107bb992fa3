"""Shared fixtures: tiny models with random (non-trivial) weights, built once per session."""

from __future__ import annotations

import pytest
import torch
from ecm.runtime.scales import PATCH_NUMS_256

from ecm import VAR, VQVAE, var_config, vqvae_config


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values so that no path is trivially zero (e.g. AdaLN gammas)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("scale_mul_1H11"):
                p.copy_(torch.rand(p.shape, generator=g) * 2 + 1)  # log-scales around the official init
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def make_pair(vae_cfg, var_cfg, seed: int = 0) -> tuple[VQVAE, VAR]:
    torch.manual_seed(seed)
    vae = randomize_(VQVAE(vae_cfg), seed)
    var = randomize_(VAR(var_cfg, vae), seed + 1)
    var.cond_drop_rate = 0.0
    return vae, var


@pytest.fixture(scope="session")
def tiny_pair() -> tuple[VQVAE, VAR]:
    """The tiny preset: 64 px, six scales, depth 4."""
    return make_pair(vqvae_config("tiny"), var_config("tiny"))


@pytest.fixture(scope="session")
def d16_pair() -> tuple[VQVAE, VAR]:
    """d16 proportions (width 1024, 16 heads, 4096 codes, the ten official scales) with 2 blocks.

    The VQVAE convs are shrunk (its quantizer is the official one): only the VAR is d16-like.
    """
    vae_cfg = vqvae_config("tiny", vocab_size=4096, z_channels=32, ch_mult=(1, 1, 1, 1, 2),
                           patch_nums=PATCH_NUMS_256)
    return make_pair(vae_cfg, var_config("d16", vae=vae_cfg, depth=2), seed=10)


@pytest.fixture(scope="session")
def tiny_ecm(tiny_pair):
    """Random adapters (gates non-zero) for the tiny backbone."""
    from ecm.adapters import ECM, ecm_config

    _, var = tiny_pair
    return randomize_(ECM(ecm_config(var.config, var.vae.config.downsample, "tiny")), seed=5)


@pytest.fixture(scope="session")
def fp32_export(tiny_pair, tiny_ecm, tmp_path_factory):
    """The tiny backbone + adapters exported in fp32, with the static per-scale graphs too."""
    from ecm.export.pipeline import ExportOptions, export_model

    out = tmp_path_factory.mktemp("fp32")
    return export_model(tiny_pair[1], tiny_ecm, out, ExportOptions(precision="fp32", static_scales=True),
                        progress=lambda _: None)
