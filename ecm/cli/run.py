"""``ecm-run``: generate images with an exported engine (ONNX Runtime or TensorRT), torch-free.

Everything here but :func:`default_engine` is the runtime's; that one exports the embedded default
model on first use, with the export stack (torch), which is why it lives above the runtime.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import click
import numpy as np

from ecm.runtime.backend import Backend
from ecm.runtime.controls import control_type
from ecm.runtime.engine import BACKENDS, open_engine
from ecm.runtime.errors import ECMError, exit_on_error
from ecm.runtime.files import cache_dir, file_sha256
from ecm.runtime.images import grid, prepare_condition, read_image, save_png, zoom
from ecm.runtime.inpaint import Inpaint, inpaint_input, outpaint_input, parse_margins
from ecm.runtime.loop import Sampling, ScaleLoop
from ecm.runtime.manifest import MANIFEST_NAME, Manifest

MAX_CPU_BATCH = 8


def default_engine(progress: Callable[[str], None] = print) -> Path:
    """The embedded default model exported to fp32 ONNX, made on first use (needs the export extra).

    Kept in ecm's cache folder under the hash of the model's files, so a new default model gets a
    new export.
    """
    assets = resources.files("ecm") / "assets" / "default"
    adapters = sorted(p.name for p in assets.iterdir() if p.name.startswith("ecm_"))
    digest = file_sha256(*(assets / name for name in ("vqvae.safetensors", "var.safetensors", *adapters)))
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


def split_cond(value: str) -> tuple[str | None, Path]:
    """``--cond FILE`` -> (None, FILE); ``--cond NAME=FILE`` -> (NAME, FILE) unless FILE=... is itself a file."""
    name, sep, path = value.partition("=")
    if not sep or Path(value).exists() or not name or "/" in name:
        return None, Path(value)
    return name, Path(path)


def parse_weights(values: tuple[str, ...], m: Manifest) -> dict[str, float]:
    """``--control-weight canny=1.0,lowres=0.6`` (repeatable) -> {name: weight}, names checked against the engine."""
    weights = {}
    for part in filter(None, (p.strip() for v in values for p in v.split(","))):
        name, _, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ECMError(f"--control-weight {part!r} is not name=number (e.g. canny=1.0,lowres=0.6)")
        m.control_index(name)  # a control the engine lacks: one line naming the ones it has
        weights[name] = weight
    return weights


def load_conditions(values: tuple[str | Path, ...], m: Manifest, control: tuple[str, ...] | str | None = (),
                    raw: bool = False) -> list[dict[str, np.ndarray]]:
    """The ``--cond`` values as rows of control graph inputs (uint8 (R, R, 3) per control name).

    ``FILE`` values make one row each, for the engine's first control; ``NAME=FILE`` values combine: row k
    takes the k-th condition of every named control. ``control`` names the controls whose conditions are
    photos to extract their maps from.
    """
    control = (control,) if isinstance(control, str) else tuple(control or ())
    if not m.controls:
        if values or control:
            raise ECMError("this engine has no control adapters (exported with --no-ecm); drop --cond / --control")
        return []
    for name in control:
        control_type(name)  # unknown: one line naming the known ones and the plug-in group
        if name not in m.control_names:
            raise ECMError(f"--control {name}, but this engine's adapters follow "
                           f"{', '.join(map(repr, m.control_names))}")
    if raw and control:
        raise ECMError("--raw-cond uses a condition as it is, --control extracts a map from it: pick one")
    pairs = [split_cond(str(v)) for v in values]
    named: dict[str, list[Path]] = {}
    for name, path in pairs:
        named.setdefault(name or m.control_names[0], []).append(path)
    if any(name is None for name, _ in pairs) and any(name is not None for name, _ in pairs):
        raise ECMError("--cond values are either all files (one row each, for the engine's first control) or all "
                       "name=file (combined); do not mix them")
    for name in named:
        m.control_index(name)
    for name in control:
        if name not in named:
            raise ECMError(f"--control {name} extracts maps from {name} conditions, but no --cond follows {name}; "
                           f"pass --cond {name}=PHOTO")
    counts = {name: len(paths) for name, paths in named.items()}
    if len(set(counts.values())) > 1 and any(name is not None for name, _ in pairs):
        raise ECMError(f"named conditions make rows together, so each control needs as many: got {counts}")
    rows = []
    for k in range(max(counts.values(), default=0)):
        row = {}
        for name, paths in named.items():
            spec = m.controls[m.control_index(name)]
            row[name] = prepare_condition(read_image(paths[k]), spec, extract=name in control, raw=raw,
                                          source=str(paths[k]))
        rows.append(row)
    return rows


def batch_size(m: Manifest, runner: Backend, images: int, batch: int | None = None) -> int:
    """Images per engine call: the plans' batch on TensorRT (refusing another ``batch``), else ``batch`` or up to
    MAX_CPU_BATCH, no more than the ``images`` asked for."""
    if runner.name != "TensorRT":
        return min(batch or MAX_CPU_BATCH, images)
    if batch not in (None, m.batch):
        raise ECMError(f"these plans are built for batch {m.batch}; drop --batch or re-export with --batch {batch}")
    return m.batch


def read_inpaint(init: Path | None, mask: Path | None, outpaint: str | None, m: Manifest) -> Inpaint | None:
    """The canvas and mask of ``--init`` with ``--mask`` or ``--outpaint``, or None without ``--init``."""
    if init is None:
        if mask is not None or outpaint is not None:
            raise ECMError(f"--{'mask' if mask is not None else 'outpaint'} edits an image: add --init with the "
                           "image to keep")
        return None
    if (mask is None) == (outpaint is None):
        raise ECMError("--init needs either --mask (white = generate) or --outpaint (e.g. left=16,right=16)")
    if mask is not None:
        return inpaint_input(init, mask, m.image_size)
    return outpaint_input(init, parse_margins(outpaint), m.image_size)


def shown(canvas: Inpaint) -> np.ndarray:
    """The canvas as a grid shows it: the region to generate greyed out."""
    g = canvas.generate[..., None]
    return (canvas.image * (1 - 0.6 * g) + 96 * g).astype(np.uint8)


@click.command()
@click.option("--engine", type=click.Path(path_type=Path), default=None,
              help="var_ecm.plan (TensorRT), var_ecm.onnx or an ecm-export folder (ONNX Runtime). "
                   "Default: the embedded default model, exported to ONNX on first use.")
@click.option("--cond", "conds", multiple=True,
              help="Condition image: a control map (white edges on black for Canny), or a photo with --control. "
                   "FILE follows the engine's first control, one row each; NAME=FILE the named control, and named "
                   "conditions combine (--cond canny=edge.png --cond lowres=small.png).")
@click.option("--control", multiple=True,
              help="Extract this control's map from its --cond photos (canny, sketch, lowres, grayscale, or a "
                   "control an installed plug-in declares). Repeatable.")
@click.option("--control-weight", "control_weights", multiple=True,
              help="Per-control weights, e.g. canny=1.0,lowres=0.6 (default 1 each; a control without --cond is "
                   "off).")
@click.option("--init", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Image to edit: keep it where --mask is black and generate where it is white (or --outpaint).")
@click.option("--mask", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Inpainting mask, the size of --init: white = generate, black = keep.")
@click.option("--outpaint", default=None,
              help="Extend --init by these margins, in output pixels, e.g. left=16,right=16 (sides: left, right, "
                   "top, bottom); the image is resized into the rest.")
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
def main(engine, conds, control, control_weights, init, mask, outpaint, raw_cond, labels, seed, temperature, cfg,
         top_k, top_p, num_images, batch, out, save_steps, backend, device, threads, verbose) -> None:
    """Generate images with an exported ECM engine, scale by scale, without torch.

    Several controls at once: --cond canny=edge.png --cond lowres=small.png --control-weight canny=1,lowres=0.6.
    Inpainting: --init photo.png --mask mask.png; outpainting: --init photo.png --outpaint left=16,right=16.
    """
    check_writable(out)
    if engine is None:
        engine = default_engine(progress=click.echo)
    m, runner = open_engine(engine, backend, device, threads)
    for label in labels:
        if not 0 <= label < m.num_classes:
            raise ECMError(f"--class {label} is out of range: this model has {m.num_classes} classes "
                           f"(0..{m.num_classes - 1})")
    sampling = Sampling.defaults(m, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature)
    weights = parse_weights(control_weights, m)
    conditions = load_conditions(conds, m, control, raw_cond)
    canvas = read_inpaint(init, mask, outpaint, m)
    unused = sorted(set(weights) - {name for row in conditions for name in row})
    if unused:
        raise ECMError(f"--control-weight names {', '.join(unused)}, which no --cond follows; add --cond "
                       f"{unused[0]}=FILE or drop the weight")
    if m.controls and not conditions and canvas is None:
        raise ECMError(f"this engine follows {', '.join(m.control_names)} conditions: pass --cond with a control "
                       f"map (or a photo with --control {m.control_names[0]})")
    conditions = conditions or [{}]
    if len(labels) not in (1, len(conditions)):
        raise ECMError(f"{len(labels)} --class values for {len(conditions)} conditions; give one, or one per --cond")
    labels = labels * len(conditions) if len(labels) == 1 else labels
    B = batch_size(m, runner, num_images, batch)
    with runner:  # sessions, plans and streams are released however the run ends
        loop = ScaleLoop(m, runner, B)
        rows, strips, seconds, timings = [], [], 0.0, []
        for cond, label in zip(conditions, labels):
            images, steps = [], []
            cond_B = {name: np.repeat(c[None], B, axis=0) for name, c in cond.items()}
            inpaint = canvas.batch(B) if canvas is not None else None
            for start in range(0, num_images, B):
                t0 = time.perf_counter()
                traj = loop.run(np.full(B, label), cond_B, sampling, weights=weights, inpaint=inpaint,
                                seed=seed + start, steps=save_steps, timed=verbose)
                seconds += time.perf_counter() - t0
                timings.append(traj.seconds)
                keep = min(B, num_images - start)
                images += list(traj.images[:keep])
                steps += [[s[i] for s in traj.step_images] for i in range(keep)]
            rows.append([*cond.values(), *([shown(canvas)] if canvas is not None else []), *images])
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
