"""``ecm-pack-default``: a trained backbone and adapters become the embedded default model (fp16)."""

from __future__ import annotations

from pathlib import Path

import click

from ecm.runtime.errors import exit_on_error


@click.command()
@click.option("--backbone", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="ecm-pretrain output folder (vqvae.safetensors, var.safetensors).")
@click.option("--ecm", "ecm_paths", type=click.Path(dir_okay=False, path_type=Path), required=True, multiple=True,
              help="ecm-train adapters (ecm.safetensors); repeat for each control, the first one first.")
@exit_on_error
def main(backbone: Path, ecm_paths: tuple[Path, ...]) -> None:
    """Pack a trained model as the embedded default (fp16, into ecm/assets/default)."""
    from ecm.model.embedded import pack_default

    for path in pack_default(backbone, list(ecm_paths)):
        click.echo(f"{path}  {path.stat().st_size / 1e6:.1f} MB")
