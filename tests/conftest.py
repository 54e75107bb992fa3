"""Shared fixtures: tiny models with random (non-trivial) weights, built once per session."""

from __future__ import annotations

import numpy as np
import pytest
from ecm.runtime.scales import PATCH_NUMS_256
from PIL import Image

from ecm import VAR, VQVAE, var_config, vqvae_config
from ecm.bench.models import make_pair, randomize_


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
    from ecm.model.adapters import ECM, ecm_config

    _, var = tiny_pair
    return randomize_(ECM(ecm_config(var.config, var.vae.config.downsample, "tiny")), seed=5)


@pytest.fixture(scope="session")
def fp32_export(tiny_pair, tiny_ecm, tmp_path_factory):
    """The tiny backbone + adapters exported in fp32, with the static per-scale graphs too."""
    from ecm.export.pipeline import ExportOptions, Models, export_model

    out = tmp_path_factory.mktemp("fp32")
    return export_model(Models(tiny_pair[1], tiny_ecm), out, ExportOptions(precision="fp32", static_scales=True),
                        progress=lambda _: None)


@pytest.fixture(scope="session")
def fp16_export(tiny_pair, tiny_ecm, tmp_path_factory):
    """The same in fp16."""
    from ecm.export.pipeline import ExportOptions, Models, export_model

    out = tmp_path_factory.mktemp("fp16")
    return export_model(Models(tiny_pair[1], tiny_ecm), out, ExportOptions(precision="fp16"), progress=lambda _: None)


@pytest.fixture(scope="session")
def edge_png(tmp_path_factory):
    """A 64 px Canny-like condition: white lines on black."""
    arr = np.zeros((64, 64), np.uint8)
    arr[12:50, 20] = arr[12:50, 44] = arr[12, 20:45] = arr[49, 20:45] = 255
    path = tmp_path_factory.mktemp("cond") / "edge.png"
    Image.fromarray(arr).save(path)
    return path
