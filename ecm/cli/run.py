"""``ecm-run``: generate images with an exported engine (ONNX Runtime or TensorRT), torch-free.

Everything here but :func:`default_engine` is the runtime's; that one exports the embedded default
model on first use, with the export stack (torch), which is why it lives above the runtime.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import click
import numpy as np

from ecm.runtime.controls import control_type
from ecm.runtime.engine import BACKENDS, open_engine
from ecm.runtime.errors import ECMError, exit_on_error
from ecm.runtime.files import cache_dir, file_sha256
from ecm.runtime.images import grid, prepare_condition, read_image, save_png, zoom
from ecm.runtime.loop import Sampling, ScaleLoop
from ecm.runtime.manifest import MANIFEST_NAME, Manifest

MAX_CPU_BATCH = 8


def default_engine(progress: Callable[[str], None] = print) -> Path:
    """The embedded default model exported to fp32 ONNX, made on first use (needs the export extra).

    Kept in ecm's cache folder under the hash of the model's files, so a new default model gets a
    new export.
    """
    assets = resources.files("ecm") / "assets" / "default"
    digest = file_sha256(*(assets / name for name in ("vqvae.safetensors", "var.safetensors",
                                                      "ecm_canny.safetensors")))
    folder = cache_dir() / f"default-{digest[:12]}-fp32"
    if (folder / MANIFEST_NAME).is_file():
        return folder
    try:
        from ecm.export.pipeline import Checkpoints, ExportOptions, export_model
    except ImportError:
        raise ECMError("no --engine given, and exporting the embedded default model needs the export stack: "
                       "pip install 'ecm[train,export,cpu]', or pass --engine with an ecm-export folder") from None
    progress(f"exporting the embedded default model to ONNX once, into {folder} ...")
    # Exported beside the cache and renamed into place whole: a run starting meanwhile never sees a folder in the
    # middle of an export, and of two first runs at once, the one that finishes second uses the first one's.
    staging = folder.with_name(f".{folder.name}.{os.getpid()}")
    try:
        export_model(Checkpoints(), staging, ExportOptions(precision="fp32"), progress=progress)
        try:
            os.rename(staging, folder)
        except OSError as e:
            if not (folder / MANIFEST_NAME).is_file():
                raise ECMError(f"cannot move the default model's export into {folder} ({e.strerror or e}); "
                               "delete that folder and run again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def check_writable(path: Path) -> None:
    """Fail before any work if ``path`` cannot be written."""
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ECMError(f"cannot write {path}; choose a writable --out file")


def load_conditions(paths: tuple[Path, ...], m: Manifest, control: str | None,
                    raw: bool = False) -> list[np.ndarray]:
    """Each ``--cond`` as the control graph's uint8 input; ``--control <type>`` extracts the map from photos."""
    if m.control is None:
        if paths or control:
            raise ECMError("this engine has no control adapters (exported with --no-ecm); drop --cond / --control")
        return [None]
    if not paths:
        raise ECMError(f"this engine follows {m.control.type!r} conditions: pass --cond with a control map "
                       f"(or a photo with --control {m.control.type})")
    if control is not None:
        control_type(control)  # unknown: one line naming the known ones and the plug-in group
        if control != m.control.type:
            raise ECMError(f"--control {control}, but this engine's adapters follow {m.control.type!r}")
        if raw:
            raise ECMError("--raw-cond uses a condition as it is, --control extracts a map from it: pick one")
    return [prepare_condition(read_image(p), m.control, extract=control is not None, raw=raw, source=str(p))
            for p in paths]


@click.command()
@click.option("--engine", type=click.Path(path_type=Path), default=None,
              help="var_ecm.plan (TensorRT), var_ecm.onnx or an ecm-export folder (ONNX Runtime). "
                   "Default: the embedded default model, exported to ONNX on first use.")
@click.option("--cond", "conds", multiple=True, type=click.Path(path_type=Path),
              help="Condition image: a control map (white edges on black for Canny), or a photo with --control "
                   "canny. Repeat for several conditions.")
@click.option("--control", default=None,
              help="Extract this control's map from --cond photos (canny, or a control an installed plug-in declares).")
@click.option("--raw-cond", is_flag=True,
              help="Use --cond as it is: no check that it looks like the control's maps, no re-binarising.")
@click.option("--class", "labels", multiple=True, type=int, default=(0,), show_default=True,
              help="Class label: one for all conditions, or one per --cond in the same order.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed; image j of each condition uses seed + j.")
@click.option("--temperature", default=None, help="Temperature schedule: T, A:B, A:B@k or linear:A:B. "
              "Default: the engine's (1.0:0.8 with adapters).")
@click.option("--cfg", type=float, default=None, help="Classifier-free guidance weight. Default: the engine's.")
@click.option("--top-k", type=int, default=None, help="Top-k sampling (1 = greedy). Default: the engine's.")
@click.option("--top-p", type=float, default=None, help="Top-p sampling (0 = off). Default: the engine's.")
@click.option("-n", "--num-images", default=1, show_default=True, type=click.IntRange(min=1),
              help="Images per condition.")
@click.option("--batch", default=None, type=click.IntRange(min=1),
              help="Images per engine call. Default: the plans' batch on TensorRT, up to 8 on ONNX Runtime.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("ecm_run.png"),
              show_default=True, help="PNG to write: the image, or a grid (condition first) for several.")
@click.option("--save-steps", is_flag=True, help="Also write <out>_steps.png: each image after every scale.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: TensorRT for .plan, ONNX Runtime otherwise.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="ONNX Runtime device (cuda needs onnxruntime-gpu).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0, os.cpu_count() or 1),
              help="ONNX Runtime CPU threads (0 = all cores).")
@click.option("-v", "--verbose", is_flag=True, help="Print per-scale timings.")
@exit_on_error
def main(engine, conds, control, raw_cond, labels, seed, temperature, cfg, top_k, top_p, num_images, batch, out,
         save_steps, backend, device, threads, verbose) -> None:
    """Generate images with an exported ECM engine, scale by scale, without torch."""
    check_writable(out)
    if engine is None:
        engine = default_engine(progress=click.echo)
    m, runner = open_engine(engine, backend, device, threads)
    for label in labels:
        if not 0 <= label < m.num_classes:
            raise ECMError(f"--class {label} is out of range: this model has {m.num_classes} classes "
                           f"(0..{m.num_classes - 1})")
    sampling = Sampling.defaults(m, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature)
    conditions = load_conditions(conds, m, control, raw_cond)
    if len(labels) not in (1, len(conditions)):
        raise ECMError(f"{len(labels)} --class values for {len(conditions)} conditions; give one, or one per --cond")
    labels = labels * len(conditions) if len(labels) == 1 else labels
    is_trt = runner.name == "TensorRT"
    B = (batch or m.batch) if is_trt else min(batch or MAX_CPU_BATCH, num_images)
    if is_trt and B != m.batch:
        raise ECMError(f"these plans are built for batch {m.batch}; drop --batch or re-export with --batch {B}")
    with runner:  # sessions, plans and streams are released however the run ends
        loop = ScaleLoop(m, runner, B)
        rows, strips, seconds, timings = [], [], 0.0, []
        for cond, label in zip(conditions, labels):
            images, steps = [], []
            for start in range(0, num_images, B):
                cond_B = None if cond is None else np.repeat(cond[None], B, axis=0)
                t0 = time.perf_counter()
                traj = loop.run(np.full(B, label), cond_B, sampling, seed=seed + start, steps=save_steps, timed=verbose)
                seconds += time.perf_counter() - t0
                timings.append(traj.seconds)
                keep = min(B, num_images - start)
                images += list(traj.images[:keep])
                steps += [[s[i] for s in traj.step_images] for i in range(keep)]
            rows.append(images if cond is None else [cond, *images])
            strips += steps
    total = len(conditions) * num_images
    factor = max(1, 128 // m.image_size)
    if total == 1:
        save_png(rows[0][-1], out)
    else:
        save_png(grid([[zoom(im, factor) for im in row] for row in rows]), out)
    click.echo(f"wrote {out} ({total} image{'s' * (total > 1)}, {seconds / total:.3f} s per image, "
               f"{runner.name} on {runner.device}, {m.precision_label(runner.device == 'cpu')})")
    if save_steps:
        steps_path = out.with_name(f"{out.stem}_steps.png")
        save_png(grid([[zoom(im, factor) for im in strip] for strip in strips]), steps_path)
        click.echo(f"wrote {steps_path} (each row: one image after every scale, coarse to fine)")
    if verbose:
        click.echo(f"per call, mean over {len(timings)} batch(es) of {B}:")
        for name in timings[0]:
            click.echo(f"  {name:18} {1000 * np.mean([t[name] for t in timings]):8.2f} ms")
