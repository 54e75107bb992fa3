"""The embedded default model: a tiny VQVAE + VAR + Canny ECM trained here on procedural shapes.

Shipped as fp16 safetensors in ``ecm/assets/default``; ``make default-model`` (see the README)
reproduces it with ``ecm-pretrain`` and ``ecm-train``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ecm.runtime.errors import ECMError

if TYPE_CHECKING:
    from ecm.adapters import ECM
    from ecm.var import VAR
    from ecm.vqvae import VQVAE

DEFAULT_DIR = Path(__file__).resolve().parent / "assets" / "default"
VQVAE_FILE, VAR_FILE, ECM_FILE = "vqvae.safetensors", "var.safetensors", "ecm_canny.safetensors"

#: Procedural-set seeds: training images come from seed 0, held-out evaluation images from this one.
HELD_OUT_SEED = 1000


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
    from ecm.var import VAR
    from ecm.vqvae import VQVAE

    if vae_path is None or var_path is None:
        d_vae, d_var, _ = default_paths()
        vae_path, var_path = vae_path or d_vae, var_path or d_var
    vae = VQVAE.from_checkpoint(vae_path)
    return vae, VAR.from_checkpoint(var_path, vae=vae)


def load_default() -> tuple[VQVAE, VAR, ECM]:
    """(vae, var, ecm) of the embedded default model, in eval mode on the CPU."""
    from ecm.control_train import load_ecm

    vae, var = load_backbone()
    ecm, _ = load_ecm(default_paths()[2], var)
    return vae, var, ecm


def pack_default(backbone_dir: Path, ecm_path: Path, dest: Path = DEFAULT_DIR) -> list[Path]:
    """Write a trained backbone + adapters as the fp16 embedded default; returns the files."""
    import torch

    from ecm.checkpoint import read_checkpoint, save_model, save_safetensors
    from ecm.var import VAR
    from ecm.vqvae import VQVAE

    vae = VQVAE.from_checkpoint(Path(backbone_dir) / "vqvae.safetensors")
    var = VAR.from_checkpoint(Path(backbone_dir) / "var.safetensors", vae=vae)
    state, meta = read_checkpoint(ecm_path)
    out = [dest / VQVAE_FILE, dest / VAR_FILE, dest / ECM_FILE]
    save_model(vae, out[0], "vqvae", vae.config, dtype=torch.float16)
    save_model(var, out[1], "var", var.config, dtype=torch.float16)
    save_safetensors({k: v.half() for k, v in state.items()}, out[2], meta)
    return out


if __name__ == "__main__":
    import click

    from ecm.runtime.errors import exit_on_error

    @click.command()
    @click.option("--backbone", type=click.Path(file_okay=False, path_type=Path), required=True,
                  help="ecm-pretrain output folder (vqvae.safetensors, var.safetensors).")
    @click.option("--ecm", "ecm_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
                  help="ecm-train adapters (ecm.safetensors).")
    @exit_on_error
    def pack(backbone: Path, ecm_path: Path) -> None:
        """Pack a trained model as the embedded default (fp16, ecm/assets/default)."""
        for path in pack_default(backbone, ecm_path):
            click.echo(f"{path}  {path.stat().st_size / 1e6:.1f} MB")

    pack()
