"""The embedded default model: a tiny VQVAE + VAR + Canny ECM trained here on procedural shapes.

Shipped as fp16 safetensors in ``ecm/assets/default``; ``make default-model`` (see the README)
reproduces it with ``ecm-pretrain``, ``ecm-train`` and ``ecm-pack-default``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ecm.model.adapters import ECM, load_ecm
from ecm.model.checkpoint import read_checkpoint, save_model, save_safetensors
from ecm.model.var import VAR
from ecm.model.vqvae import VQVAE
from ecm.runtime.errors import ECMError

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "default"
VQVAE_FILE, VAR_FILE, ECM_FILE = "vqvae.safetensors", "var.safetensors", "ecm_canny.safetensors"


def default_paths() -> tuple[Path, Path, Path]:
    """The embedded VQVAE, VAR and ECM files; a clear error if any is missing."""
    paths = tuple(DEFAULT_DIR / name for name in (VQVAE_FILE, VAR_FILE, ECM_FILE))
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ECMError(f"the embedded default model is missing {', '.join(missing)} in {DEFAULT_DIR}; "
                       "reinstall ecm or run `make default-model`")
    return paths


def load_backbone(vae_path: str | Path | None = None, var_path: str | Path | None = None) -> tuple[VQVAE, VAR]:
    """(vae, var) from the given files, or the embedded default."""
    if vae_path is None or var_path is None:
        d_vae, d_var, _ = default_paths()
        vae_path, var_path = vae_path or d_vae, var_path or d_var
    vae = VQVAE.from_checkpoint(vae_path)
    return vae, VAR.from_checkpoint(var_path, vae=vae)


def load_default() -> tuple[VQVAE, VAR, ECM]:
    """(vae, var, ecm) of the embedded default model, in eval mode on the CPU."""
    vae, var = load_backbone()
    ecm, _ = load_ecm(default_paths()[2], var)
    return vae, var, ecm


def pack_default(backbone_dir: Path, ecm_path: Path, dest: Path = DEFAULT_DIR) -> list[Path]:
    """Write a trained backbone + adapters as the fp16 embedded default; returns the files."""
    vae = VQVAE.from_checkpoint(Path(backbone_dir) / "vqvae.safetensors")
    var = VAR.from_checkpoint(Path(backbone_dir) / "var.safetensors", vae=vae)
    state, meta = read_checkpoint(ecm_path)
    out = [dest / VQVAE_FILE, dest / VAR_FILE, dest / ECM_FILE]
    save_model(vae, out[0], "vqvae", vae.config, dtype=torch.float16)
    save_model(var, out[1], "var", var.config, dtype=torch.float16)
    save_safetensors({k: v.half() for k, v in state.items()}, out[2], meta)
    return out
