"""``ecm-train`` (ECM adapters on a frozen backbone) and ``ecm-pretrain`` (a backbone from scratch)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ecm.runtime.errors import ECMError, exit_on_error

if TYPE_CHECKING:
    from ecm.data.controls import Control
    from ecm.model.vqvae import VQVAE
    from ecm.train.loop import Dist
    from ecm.train.stream import StreamBatches


def _device(device: str | None) -> str | None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ECMError("--device cuda, but this machine has no usable CUDA GPU (or torch is a CPU build); "
                       "use --device cpu")
    return device


def _dataset(data: str | None, resolution: int, size: int, seed: int):
    """``--data`` folder, or the procedural set when no folder is given."""
    from ecm.data.datasets import ImageFolder, ProceduralShapes

    if data is None:
        return ProceduralShapes(size=size, resolution=resolution, seed=seed)
    return ImageFolder(Path(data), resolution)


POSITIVE = click.IntRange(min=1)
DEVICE = click.Choice(["cpu", "cuda"])


def _check_out(out: Path, resume: bool) -> None:
    """Refuse to overwrite a run without --resume, and to resume nothing."""
    states = [out / "train_state.pt", out / "vqvae" / "train_state.pt", out / "var" / "train_state.pt"]
    if any(p.exists() for p in states):
        if not resume:
            raise ECMError(f"{out} already holds a training run; pass --resume to continue it or choose "
                           "another --out")
    elif resume:
        raise ECMError(f"nothing to resume in {out}; start without --resume")


def _run_options(fn):
    """Options every training command shares: data size, seed, device, resume."""
    for option in reversed([
        click.option("--num-images", default=4096, type=POSITIVE, show_default=True,
                     help="Size of the procedural set (ignored with --data)."),
        click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Seed of data order, initialisation and dropout."),
        click.option("--device", type=DEVICE, default=None, help="cpu or cuda (default: cuda when available)."),
        click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped."),
    ]):
        fn = option(fn)
    return fn


def _backbone_options(fn):
    """--vae / --var: backbone checkpoints, defaulting to the embedded model."""
    fn = click.option("--var", "var_path", type=click.Path(dir_okay=False), default=None,
                      help="VAR backbone checkpoint (official var_d*.pth or ours). Default: the embedded model.")(fn)
    return click.option("--vae", "vae_path", type=click.Path(dir_okay=False), default=None,
                        help="VQVAE checkpoint (official vae_*.pth or ours). Default: the embedded model.")(fn)


@click.command()
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="Image folder (one sub-folder per class, or flat). Default: the procedural shapes set.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/backbone"),
              show_default=True, help="Folder for vqvae.safetensors, var.safetensors and logs.")
@click.option("--vae-preset", default="tiny", show_default=True, help="VQVAE preset (tiny, official).")
@click.option("--var-preset", default="tiny", show_default=True, help="VAR preset (tiny, d16, d20, d24, d30).")
@click.option("--vae-steps", default=1200, type=POSITIVE, show_default=True, help="VQVAE optimisation steps.")
@click.option("--var-steps", default=1200, type=POSITIVE, show_default=True, help="VAR optimisation steps.")
@click.option("--vae-batch", default=16, type=POSITIVE, show_default=True, help="VQVAE batch size per process.")
@click.option("--var-batch", default=32, type=POSITIVE, show_default=True, help="VAR batch size per process.")
@click.option("--vae-lr", default=1e-3, show_default=True, help="VQVAE peak learning rate.")
@click.option("--var-lr", default=1e-3, show_default=True, help="VAR peak learning rate.")
@_run_options
@exit_on_error
def pretrain(data, out, vae_preset, var_preset, vae_steps, var_steps, vae_batch, var_batch, vae_lr, var_lr,
             num_images, seed, device, resume) -> None:
    """Train a small VQVAE and a VAR backbone from scratch (makes the embedded default model)."""
    from ecm.data.datasets import InMemory
    from ecm.model.config import var_config, vqvae_config
    from ecm.train.loop import TrainSpec, dump_config, setup_distributed
    from ecm.train.pretrain import pretrain as run

    _check_out(out, resume)
    vae_spec = TrainSpec(steps=vae_steps, batch=vae_batch, lr=vae_lr, seed=seed)
    var_spec = TrainSpec(steps=var_steps, batch=var_batch, lr=var_lr, seed=seed + 1)
    vae_cfg = vqvae_config(vae_preset)
    ds = _dataset(data, vae_cfg.resolution, num_images, seed)
    var_cfg = var_config(var_preset, vae=vae_cfg, num_classes=len(ds.classes))
    dist = setup_distributed(_device(device))
    out.mkdir(parents=True, exist_ok=True)
    dump_config(out, command="ecm-pretrain", data=data or "procedural", vae=vae_cfg, var=var_cfg,
                vae_spec=vae_spec, var_spec=var_spec, num_images=num_images)
    run(InMemory(ds), out, vae_cfg, var_cfg, vae_spec, var_spec, dist, resume)
    if dist.main:
        click.echo(f"backbone written to {out / 'vqvae.safetensors'} and {out / 'var.safetensors'}")


def control_options(fn: Callable) -> Callable:
    """--control, --control-dir and the Canny thresholds: what ecm-train and ecm-prepare share."""
    for option in reversed([
        click.option("--control", default="canny", show_default=True,
                     help="Control type: canny, a control an installed plug-in declares (entry points ecm.controls), "
                          "or folder:<name> for maps from a folder."),
        click.option("--control-dir", type=click.Path(file_okay=False), default=None,
                     help="Folder of control maps for folder:<name>, paired with the images by relative path or "
                          "file stem."),
        click.option("--canny-low", default=100, show_default=True, help="Lower Canny threshold (control canny)."),
        click.option("--canny-high", default=200, show_default=True, help="Upper Canny threshold (control canny)."),
    ]):
        fn = option(fn)
    return fn


@click.command()
@control_options
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="A cache from ecm-prepare, or an image folder (one sub-folder per class, or flat: prepared into "
                   "a cache in the run folder first). Default: the procedural shapes set, held in memory.")
@_backbone_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder for ecm.safetensors, logs and state. Default: runs/ecm-<control>.")
@click.option("--preset", default=None, help="ECM size preset (tiny, base). Default: by backbone width.")
@click.option("--steps", default=None, type=POSITIVE, help="Optimisation steps. [default: 600, or --epochs]")
@click.option("--epochs", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Train this many passes over --data instead of --steps.")
@click.option("--batch", default=32, type=POSITIVE, show_default=True, help="Batch size per process.")
@click.option("--lr", default=1e-3, show_default=True, help="Peak learning rate (warm-up, then cosine).")
@click.option("--early-centric", default=0.8, show_default=True, type=click.FloatRange(0, 1),
              help="Probability that a batch trains only on a prefix of the scales (0 = full sequences).")
@click.option("--control-drop", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Probability of dropping a sample's control, so CFG can drop it.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="DataLoader processes reading --data ahead of the training step (0: in the training process).")
@click.option("--save-every", default=200, show_default=True, type=POSITIVE,
              help="Steps between checkpoints (the points --resume continues from).")
@_run_options
@exit_on_error
def train(control, control_dir, canny_low, canny_high, data, vae_path, var_path, out, preset, steps, epochs, batch,
          lr, early_centric, control_drop, workers, save_every, num_images, seed, device, resume) -> None:
    """Train ECM control adapters on a frozen VAR backbone.

    With no arguments: a short demonstration run on the embedded default backbone and the
    procedural shapes (minutes on a CPU). With --data: streamed from a cache on disk, any size.
    """
    import torch

    from ecm.data.cache import is_cache
    from ecm.data.controls import Control
    from ecm.model.adapters import ECM, ecm_config
    from ecm.model.embedded import load_backbone
    from ecm.train.adapters import ControlData, train_ecm
    from ecm.train.loop import TrainSpec, dump_config, setup_distributed

    out = out or Path("runs") / f"ecm-{control.replace(':', '-')}"
    _check_out(out, resume)
    if epochs is not None and steps is not None:
        raise ECMError("pass --steps or --epochs, not both")
    if epochs is not None and data is None:
        raise ECMError("--epochs counts passes over --data; the procedural demo takes --steps")
    vae, var = load_backbone(vae_path, var_path)
    resolution = vae.config.resolution
    cached = data is not None and is_cache(Path(data))
    ctrl = None if cached else Control(control, Path(control_dir) if control_dir else None, resolution, canny_low,
                                       canny_high)
    if ctrl is not None and ctrl.from_folder and data is None:
        raise ECMError(f"--control {control} pairs maps with your images: pass --data with the image folder")
    dist = setup_distributed(_device(device))
    if data is None:
        ds = _dataset(None, resolution, num_images, seed)
        source, classes, steps = ControlData(ds, ctrl, vae, show=dist.main), len(ds.classes), steps or 600
    else:
        source = _stream(Path(data), cached, ctrl, control, canny_low, canny_high, vae, vae_path, out, batch, dist,
                         seed, early_centric, steps, epochs, workers)
        classes, steps = len(source.cache.info.classes), source.steps
    if classes > var.num_classes:
        raise ECMError(f"the data has {classes} classes but the backbone knows {var.num_classes}; "
                       "use data with the backbone's classes or pretrain a backbone on it")
    spec = TrainSpec(steps=steps, batch=batch, lr=lr, seed=seed, save_every=save_every)
    torch.manual_seed(seed)
    ecm = ECM(ecm_config(var.config, vae.config.downsample, preset, control=control, canny_low=canny_low,
                         canny_high=canny_high)).to(dist.device)
    var.to(dist.device), vae.to(dist.device)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(out, command="ecm-train", control=control, data=data or "procedural",
                vae=Path(vae_path).resolve() if vae_path else "default",
                var=Path(var_path).resolve() if var_path else "default", ecm=ecm.config, spec=spec,
                early_centric=early_centric, control_drop=control_drop)
    train_ecm(ecm, var, source, out, spec, control, early_centric, control_drop, dist, resume)
    if dist.main:
        click.echo(f"adapters written to {out / 'ecm.safetensors'}")


def _stream(data: Path, cached: bool, ctrl: Control | None, control: str, canny_low: int, canny_high: int,
            vae: VQVAE, vae_path: str | None, out: Path, batch: int, dist: Dist, seed: int, early_centric: float,
            steps: int | None, epochs: float | None, workers: int) -> StreamBatches:
    """Batches streamed from the cache ``data``, or from a cache of the folder ``data`` made in the run folder
    (opened as it is once complete: a resumed run does not scan the folder again), for ``steps`` steps or
    ``epochs`` counted in steps of this job's global batch."""
    import math

    from ecm.data.cache import CacheInfo, TokenCache, is_cache
    from ecm.train.prepare import cache_key, prepare
    from ecm.train.stream import StreamBatches

    key = cache_key(vae, control, canny_low, canny_high)
    if cached:
        cache = TokenCache(data, key)
    else:
        folder = out / "cache"
        if not (is_cache(folder) and CacheInfo.load(folder).complete):
            prepare(data, folder, vae, vae_path, ctrl, dist=dist, show=dist.main)
        cache = TokenCache(folder, key)
    stream = StreamBatches(cache, batch, dist, seed, early_centric, steps or 600, workers)
    if epochs is not None:
        stream.steps = math.ceil(epochs * stream.per_epoch)
    if dist.main:
        click.echo(f"{len(cache)} images in {cache.folder}: {stream.per_epoch} steps per epoch of {batch} x "
                   f"{dist.world} images; {stream.steps} steps = {stream.steps / stream.per_epoch:.2f} epochs")
    return stream
