"""The embedded default model: a tiny VQVAE + VAR with Canny and lowres ECMs trained here on procedural shapes.

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
VQVAE_FILE, VAR_FILE = "vqvae.safetensors", "var.safetensors"
#: The embedded adapter sets, one per control; the first is what a condition without a control name follows.
CONTROLS = ("canny", "lowres")


def ecm_file(control: str) -> str:
    """The embedded adapters of ``control``: ecm_<control>.safetensors."""
    return f"ecm_{control}.safetensors"


def _existing(names: tuple[str, ...]) -> tuple[Path, ...]:
    paths = tuple(DEFAULT_DIR / name for name in names)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ECMError(f"the embedded default model is missing {', '.join(missing)} in {DEFAULT_DIR}; "
                       "reinstall ecm or run `make default-model`")
    return paths


def default_paths() -> tuple[Path, Path, Path]:
    """The embedded VQVAE, VAR and (first, Canny) ECM files; a clear error if any is missing."""
    return _existing((VQVAE_FILE, VAR_FILE, ecm_file(CONTROLS[0])))


def default_ecm_paths() -> tuple[Path, ...]:
    """Every embedded adapter set, in :data:`CONTROLS` order."""
    return _existing(tuple(ecm_file(c) for c in CONTROLS))


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


def pack_default(backbone_dir: Path, ecm_paths: list[Path], dest: Path = DEFAULT_DIR) -> list[Path]:
    """Write a trained backbone + adapter sets as the fp16 embedded default; returns the files. Each adapter set
    is stored under its control's name (``ecm_<control>.safetensors``)."""
    vae = VQVAE.from_checkpoint(Path(backbone_dir) / "vqvae.safetensors")
    var = VAR.from_checkpoint(Path(backbone_dir) / "var.safetensors", vae=vae)
    out = [dest / VQVAE_FILE, dest / VAR_FILE]
    save_model(vae, out[0], "vqvae", vae.config, dtype=torch.float16)
    save_model(var, out[1], "var", var.config, dtype=torch.float16)
    for path in ecm_paths:
        load_ecm(path, var)  # adapters of another backbone are refused here, not when the default is first used
        state, meta = read_checkpoint(path)
        out.append(dest / ecm_file(meta["control"]))
        save_safetensors({k: v.half() for k, v in state.items()}, out[-1], meta)
    return out
