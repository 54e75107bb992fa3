"""``ecm-export``: checkpoints -> verified ONNX graphs (+ TensorRT plans where a GPU is present).

The command sits above both export and calibration: int8 exports go through ``ecm.calibration``.
"""

from __future__ import annotations

from pathlib import Path

import click

from ecm.calibration.options import (
    ACTIVATIONS,
    DEFAULT_BATCH,
    DEFAULT_SAMPLES,
    MIN_AGREEMENT,
    REPORT_IMAGES,
    SCOPES,
    SMOOTH_ALPHA,
    CalibOptions,
)
from ecm.runtime.errors import ECMError, exit_on_error
from ecm.runtime.manifest import PRECISIONS


def latest_training_run(where: Path = Path(".")) -> Path | None:
    """The newest ``ecm-train`` result below ``where`` (``runs/*/ecm.safetensors``), if any."""
    runs = [p for p in where.glob("runs/*/ecm.safetensors") if (p.parent / "run.json").is_file()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def resolve_checkpoints(ecm_paths: tuple[Path, ...], vae_path: Path | None, var_path: Path | None,
                        with_ecm: bool) -> tuple[tuple[Path, ...], Path | None, Path | None, str]:
    """Which checkpoints to export, and a line saying so: the given adapter sets (else the latest run here, else
    the embedded default's) on the given backbone, else the one the first set's training run recorded."""
    if not with_ecm:
        if ecm_paths:
            raise ECMError("--no-ecm exports the backbone alone: drop --ecm, or drop --no-ecm")
        return (), vae_path, var_path, "exporting the backbone alone (no adapters)"
    from ecm.train.adapters import trained_backbone

    what = f"exporting {', '.join(map(str, ecm_paths)) or 'the embedded default adapters'}"
    if not ecm_paths and (run := latest_training_run()) is not None:
        ecm_paths, what = (run,), f"exporting the latest ecm-train result, {run}"
    if ecm_paths and vae_path is None and var_path is None:
        vae_path, var_path = trained_backbone(ecm_paths[0])
    return ecm_paths, vae_path, var_path, what


@click.command()
@click.option("--ecm", "ecm_paths", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              help="Adapters from ecm-train; repeat to merge several controls into one engine (weights set at run "
                   "time). Default: the newest runs/*/ecm.safetensors here, else the embedded default model's.")
@click.option("--vae", "vae_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="VQVAE checkpoint (ours or an official vae_*.pth). Default: the one the adapters were trained "
                   "with.")
@click.option("--var", "var_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="VAR checkpoint (ours or an official var_d*.pth). Default: the one the adapters were trained "
                   "with.")
@click.option("--no-ecm", is_flag=True, help="Export the backbone alone, without control adapters.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="Folder for var_ecm.json, the graphs and the plans.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp16", show_default=True,
              help="Precision in the graph: fp16 for GPUs (fp32 norms, softmax, head, sampling), fp32 for CPUs.")
@click.option("--opset", default=20, show_default=True, help="ONNX opset, 17..21 (TensorRT 10.3 parses up to 20).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Images per run that the TensorRT profiles are built for.")
@click.option("--candidates", default=None, type=click.IntRange(min=1),
              help="Tokens the sampler sorts, the largest top-k a run may use. Default: the default top-k (900), "
                   "or the vocabulary if smaller.")
@click.option("--static-scales", is_flag=True,
              help="Also export one fully static step graph per scale (weights stored once per scale).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="INT8 calibration: a folder of condition maps (as ecm-run --cond takes them) or of calibration "
                   "data recorded by an earlier int8 export. Default: procedural conditions.")
@click.option("--calib-samples", default=DEFAULT_SAMPLES, show_default=True, type=click.IntRange(min=1),
              help="INT8: generations recorded for calibration (each calibrates every scale).")
@click.option("--calib-batch", default=DEFAULT_BATCH, show_default=True, type=click.IntRange(min=1),
              help="INT8: generations per calibration batch (memory grows with it).")
@click.option("--int8-scope", type=click.Choice(SCOPES), default="linear", show_default=True,
              help="INT8: 'linear' quantizes the linear layers but the vocabulary head; 'all' also the head and "
                   "the attention products.")
@click.option("--int8-activations", type=click.Choice(ACTIVATIONS), default="auto", show_default=True,
              help="INT8: inputs of the quantized layers in the TensorRT (Q/DQ) graphs. 'int8' (W8A8, INT8 tensor "
                   "cores, per-tensor ranges from calibration), 'fp16' (W8A16, weight-only, needs no calibration), "
                   f"'auto': int8 if it keeps {100 * MIN_AGREEMENT:.0f}% top-1 agreement with fp32 at every scale "
                   "of the calibration set, else fp16.")
@click.option("--smooth", default=SMOOTH_ALPHA, show_default=True, type=click.FloatRange(0, 1),
              help="INT8: SmoothQuant strength for W8A8 Q/DQ (TensorRT) graphs; 0 turns it off.")
@click.option("--report-images", default=REPORT_IMAGES, show_default=True, type=click.IntRange(min=1),
              help="INT8: held-out images of the fp32-vs-INT8 report (var_ecm.int8.json, var_ecm.int8.png).")
@click.option("--no-build", is_flag=True, help="Stop after ONNX even where TensorRT and a GPU are present.")
@click.option("--build-only", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Only build TensorRT plans for an existing export folder (run this on the target GPU).")
@exit_on_error
def main(ecm_paths, vae_path, var_path, no_ecm, out, precision, opset, batch, candidates, static_scales, calib,
         calib_samples, calib_batch, int8_scope, int8_activations, smooth, report_images, no_build, build_only) -> None:
    """Export backbone + ECM adapters to ONNX (verified with ONNX Runtime) and TensorRT plans.

    With no arguments: the newest ecm-train result in this folder (else the embedded default
    model), fp16, into the current folder.
    """
    from ecm.export.tensorrt import build_command, build_plans, missing_tensorrt

    if build_only is not None:
        m = build_plans(build_only, progress=click.echo)
        click.echo(f"plans for TensorRT {m.tensorrt['version']} (compute {m.tensorrt['compute_capability']}) "
                   f"written to {build_only}")
        return
    from ecm.export.onnx_export import check_opset
    from ecm.export.pipeline import Checkpoints, ExportOptions, export_model

    check_opset(opset)
    if calib is not None and precision != "int8":
        raise ECMError("--calib calibrates INT8 exports; add --precision int8 or leave --calib out")
    ecm_paths, vae_path, var_path, what = resolve_checkpoints(ecm_paths, vae_path, var_path, not no_ecm)
    click.echo(what)
    models = Checkpoints(vae_path, var_path, ecm_paths, with_ecm=not no_ecm)
    opts = ExportOptions(precision=precision, opset=opset, batch=batch, candidates=candidates,
                         static_scales=static_scales)
    if precision == "int8":
        from tqdm import tqdm

        from ecm.calibration.pipeline import export_int8

        calib_opts = CalibOptions(source=calib, samples=calib_samples, batch=calib_batch, scope=int8_scope,
                                  activations=int8_activations, smooth=smooth, report_images=report_images)
        result = export_int8(models, out, opts, calib_opts, progress=click.echo,
                             bar=lambda it: tqdm(it, desc="calibration", unit="batch", dynamic_ncols=True))
    else:
        result = export_model(models, out, opts, progress=click.echo)
    graphs = ", ".join(result.manifest.graphs.values())
    click.echo(f"wrote {out.resolve()}: var_ecm.json, {graphs} (weights in *.onnx.data), var_ecm.verify.json, "
               "golden/")
    reason = missing_tensorrt()
    if no_build:
        return
    if reason is not None:
        click.echo(f"TensorRT plans not built here: {reason}. Copy {out.resolve()} to the target GPU and run there:\n"
                   f"  {build_command(Path('<folder>'))}")
        return
    try:
        build_plans(out, progress=click.echo)
    except ECMError as e:
        raise ECMError(f"the ONNX export in {out} is complete, but {e}") from None
