"""The benchmarks' models: the embedded default, and random-weight ones: the d16-proportioned model (4
blocks), official-shaped stand-ins of VAR-d16..d30 (written as checkpoint files, which is how a user's
official backbone reaches ecm), the tests' fixtures."""

from __future__ import annotations

from pathlib import Path

import torch

from ecm.export.pipeline import Checkpoints
from ecm.model.adapters import ECM, ecm_config, save_ecm
from ecm.model.checkpoint import tensor_hash
from ecm.model.config import VARConfig, VQVAEConfig, var_config, vqvae_config
from ecm.model.embedded import load_default
from ecm.model.var import VAR
from ecm.model.vqvae import VQVAE
from ecm.runtime.scales import PATCH_NUMS_256

#: What ecm-bench measures unless told: the embedded default and the random d16-proportioned one.
MODELS = ("default", "d16-4")
#: Official-shaped random-weight stand-ins (VQVAE vae_ch160v4096z32, VAR-dN, ECM base), 310 M to 2 B parameters.
OFFICIAL = ("d16", "d20", "d24", "d30")
STANDIN_FILES = ("vae_ch160v4096z32.pth", "var_{}.pth", "ecm.safetensors")


def load_model(name: str) -> tuple[VAR, ECM]:
    """(var, ecm) of a benchmark model by name (MODELS, or a folder that :func:`write_standin` filled), in eval
    mode on the CPU."""
    if name == "default":
        _, var, ecm = load_default()
        return var, ecm
    if name == "d16-4":
        return d16_proportioned()
    if Path(name).is_dir():
        return standin_checkpoints(Path(name)).load()
    raise ValueError(f"unknown benchmark model {name!r}; choose one of {', '.join(MODELS + OFFICIAL)}")


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


def official_standin(name: str, seed: int = 0) -> tuple[VAR, ECM]:
    """An official-shaped VAR (preset ``name``) on the official VQVAE with ECM base adapters, random weights:
    the modules' own initialisation, gates drawn small and non-zero so that the adapters act."""
    torch.manual_seed(seed)
    vae = VQVAE(vqvae_config("official")).eval()
    var = VAR(var_config(name, vae.config), vae).eval()
    ecm = ECM(ecm_config(var.config, vae.config.downsample)).eval()
    with torch.no_grad():
        ecm.gates.normal_(0, 0.02)
    return var, ecm


def write_standin(name: str, folder: Path) -> Checkpoints:
    """Write the stand-in ``name`` as the checkpoint files a user would bring (official .pth files and our
    adapters) into ``folder``; returns them as an export source."""
    var, ecm = official_standin(name)
    folder.mkdir(parents=True, exist_ok=True)
    vae_file, var_file, ecm_file = (folder / f.format(name) for f in STANDIN_FILES)
    torch.save(var.vae.state_dict(), vae_file)
    torch.save(var.state_dict(), var_file)
    save_ecm(ecm, ecm_file, tensor_hash(var.state_dict()), "canny", 0)
    return Checkpoints(vae_file, var_file, (ecm_file,))


def standin_checkpoints(folder: Path) -> Checkpoints:
    """The checkpoint files :func:`write_standin` wrote into ``folder``."""
    var_file = next(folder.glob("var_d*.pth"))
    return Checkpoints(folder / STANDIN_FILES[0], var_file, (folder / STANDIN_FILES[2],))
