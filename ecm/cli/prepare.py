"""``ecm-prepare``: an image folder made into a training cache once (tokens, labels, control maps)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ecm.cli.train import DEVICE, POSITIVE, _device, control_options
from ecm.runtime.errors import exit_on_error


@click.command()
@click.argument("source", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache folder. Default: <source>-<control>-cache beside the source folder.")
@click.option("--vae", "vae_path", type=click.Path(dir_okay=False), default=None,
              help="The frozen VQVAE that tokenizes (official vae_*.pth or ours); its resolution is the cache's. "
                   "Default: the embedded model's.")
@control_options
@click.option("--shard-size", default=1024, show_default=True, type=POSITIVE,
              help="Images per shard: the unit of work, of resumption and of parallelism.")
@click.option("--batch", default=32, show_default=True, type=POSITIVE, help="Images the VQVAE encodes at once.")
@click.option("--workers", default=1, show_default=True, type=POSITIVE,
              help="Processes preparing shards in parallel (per torchrun process).")
@click.option("--max-bad", default=0.01, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of unreadable images that is skipped; more stops the run.")
@click.option("--map-format", default="auto", show_default=True, type=click.Choice(["auto", "bits", "grey", "rgb"]),
              help="How control maps are stored: auto = packed bits for binary controls, else grey or RGB as the "
                   "first map is.")
@click.option("--device", type=DEVICE, default=None, help="cpu or cuda (default: cuda when available).")
@exit_on_error
def main(source, out, vae_path, control, control_dir, canny_low, canny_high, shard_size, batch, workers, max_bad,
         map_format, device) -> None:
    """Tokenize the images of SOURCE with the frozen VQVAE and store them with labels and control maps.

    SOURCE: ImageNet layout (a sub-folder per class; sorted names are the class indices) or a flat
    folder. Run it again to continue after a stop; under torchrun every process prepares its share.
    """
    from ecm.data.controls import Control
    from ecm.model.embedded import default_paths
    from ecm.model.vqvae import VQVAE
    from ecm.train.loop import setup_distributed
    from ecm.train.prepare import prepare

    t0 = time.perf_counter()
    out = out or Path(source).resolve().parent / f"{Path(source).resolve().name}-{control.replace(':', '-')}-cache"
    dist = setup_distributed(_device(device))
    vae = VQVAE.from_checkpoint(vae_path or default_paths()[0]).to(dist.device).eval()
    ctrl = Control(control, Path(control_dir) if control_dir else None, vae.config.resolution, canny_low, canny_high)
    summary = prepare(Path(source), out, vae, vae_path, ctrl, shard_size=shard_size, batch=batch, workers=workers,
                      max_bad=max_bad, map_format=map_format, dist=dist, show=dist.main)
    if dist.main:
        for line in summary.lines():
            click.echo(line)
        click.echo(f"done in {time.perf_counter() - t0:.1f} s")
