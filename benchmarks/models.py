"""The random-weight d16-proportioned model the benchmarks measure beside the embedded default.

Width 1024, 16 heads, the ten official scales and 4096 codes like VAR-d16, but 4 blocks and 2 ECM
adapters (and a small VQVAE around the official quantizer), so it runs on two CPU cores.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ecm.runtime.scales import PATCH_NUMS_256

from ecm import ECM, var_config, vqvae_config
from ecm.adapters import ecm_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import make_pair, randomize_


def d16_proportioned() -> tuple:
    """(var, ecm) with random weights; the gates are non-zero, so the adapters act."""
    vae_cfg = vqvae_config("tiny", vocab_size=4096, z_channels=32, ch_mult=(1, 1, 1, 1, 2), patch_nums=PATCH_NUMS_256)
    _, var = make_pair(vae_cfg, var_config("d16", vae=vae_cfg, depth=4), seed=10)
    ecm = randomize_(ECM(ecm_config(var.config, vae_cfg.downsample, "base", num_adapters=2)), seed=3)
    return var, ecm
