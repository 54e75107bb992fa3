"""The benchmarks' models: the embedded default, and random-weight ones (the d16-proportioned model, the
tests' fixtures)."""

from __future__ import annotations

import torch

from ecm.model.adapters import ECM, ecm_config
from ecm.model.config import VARConfig, VQVAEConfig, var_config, vqvae_config
from ecm.model.embedded import load_default
from ecm.model.var import VAR
from ecm.model.vqvae import VQVAE
from ecm.runtime.scales import PATCH_NUMS_256

#: The models the benchmarks measure: the embedded default and the random d16-proportioned one.
MODELS = ("default", "d16")


def load_model(name: str) -> tuple[VAR, ECM]:
    """(var, ecm) of a benchmark model by name (see MODELS), in eval mode on the CPU."""
    if name == "default":
        _, var, ecm = load_default()
        return var, ecm
    if name == "d16":
        return d16_proportioned()
    raise ValueError(f"unknown benchmark model {name!r}; choose one of {', '.join(MODELS)}")


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


def make_pair(vae_cfg: VQVAEConfig, var_cfg: VARConfig, seed: int = 0) -> tuple[VQVAE, VAR]:
    """A random VQVAE and a random VAR on it (no class dropout, so checks are deterministic)."""
    torch.manual_seed(seed)
    vae = randomize_(VQVAE(vae_cfg), seed)
    var = randomize_(VAR(var_cfg, vae), seed + 1)
    var.cond_drop_rate = 0.0
    return vae, var


def d16_proportioned() -> tuple[VAR, ECM]:
    """(var, ecm) shaped like VAR-d16 where it counts per block, small enough for two CPU cores.

    Width 1024, 16 heads, the ten official scales and 4096 codes like VAR-d16, but 4 blocks and 2
    ECM adapters (and a small VQVAE around the official quantizer). Random weights; the gates are
    non-zero, so the adapters act.
    """
    vae_cfg = vqvae_config("tiny", vocab_size=4096, z_channels=32, ch_mult=(1, 1, 1, 1, 2), patch_nums=PATCH_NUMS_256)
    _, var = make_pair(vae_cfg, var_config("d16", vae=vae_cfg, depth=4), seed=10)
    ecm = randomize_(ECM(ecm_config(var.config, vae_cfg.downsample, "base", num_adapters=2)), seed=3)
    return var, ecm
