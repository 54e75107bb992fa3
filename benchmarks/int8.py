"""INT8 against fp32 on ONNX Runtime's CPU kernels, side by side in one run.

For the random-weight d16-proportioned model and the embedded default: seconds per image (batch
1) of the fp32 export, the INT8 export's CPU form (what ``ecm-run`` picks on a CPU) and its Q/DQ
graphs (what TensorRT builds from, W8A8 or W8A16 as ``--int8-activations auto`` chose; run here
by ONNX Runtime), alternating in rounds of about a second: best of ``--repeats``, and the median
of the per-round INT8/fp32 ratios. Also the step graph's file size of each, and the export's INT8
report (teacher-forced agreement per scale, Canny F1) for the default model.

    python benchmarks/int8.py [--repeats 9] [--report-images 512]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import numpy as np
from ecm.calibration import CalibOptions, export_int8
from ecm.export.pipeline import ExportOptions, Models, export_model
from ecm.runtime.loop import Sampling, ScaleLoop
from ecm.runtime.manifest import Manifest
from ecm.runtime.ort_backend import OrtBackend

from ecm.bench.models import d16_proportioned
from ecm.bench.timing import condition, per_image
from ecm.model.embedded import load_default


def file_mb(folder: Path, name: str) -> float:
    return sum(p.stat().st_size for p in folder.glob(name + "*")) / 2**20


def measure(name: str, var, ecm, work: Path, repeats: int, calib: CalibOptions) -> dict:
    quiet = lambda _: None  # noqa: E731
    fp32, int8 = work / f"{name}-fp32", work / f"{name}-int8"
    click.echo(f"[{name}] exporting fp32 and INT8 ({calib.samples} calibration generations) ...")
    export_model(Models(var, ecm), fp32, ExportOptions(precision="fp32", verify=False), quiet)
    result = export_int8(Models(var, ecm), int8, ExportOptions(), calib, quiet)
    m32, m8 = Manifest.load(fp32), result.manifest
    cond, label = condition(m32), np.array([1])
    loops = {"fp32": ScaleLoop(m32, OrtBackend(fp32, m32), 1), "int8": ScaleLoop(m8, OrtBackend(int8, m8), 1),
             "int8 Q/DQ": ScaleLoop(m8, OrtBackend(int8, m8, cpu_forms=False), 1)}
    runs = {k: (lambda loop=loop: loop.run(label, cond, Sampling.defaults(loop.m), seed=0))
            for k, loop in loops.items()}
    for fn in runs.values():
        fn()
    images = max(1, round(1.0 / per_image(runs["fp32"], 1)))
    click.echo(f"[{name}] timing, best of {repeats} alternating rounds of {images} image(s) ...")
    t: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t[k].append(per_image(fn, images))
    report = json.loads((int8 / "var_ecm.int8.json").read_text())
    paired = {k: float(np.median([a / b for a, b in zip(t[k], t["fp32"])])) for k in ("int8", "int8 Q/DQ")}
    return {"model": name, **{k: min(v) for k, v in t.items()}, "median_ratio": paired,
            "mb": {"fp32": file_mb(fp32, m32.graphs["step"]), "int8": file_mb(int8, m8.graphs["step_cpu"]),
                   "int8 Q/DQ": file_mb(int8, m8.graphs["step"])},
            "report": report}


@click.command()
@click.option("--repeats", default=9, show_default=True, help="Alternating timing rounds per model.")
@click.option("--report-images", default=512, show_default=True,
              help="Held-out images of the default model's INT8 report.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON here.")
def main(repeats: int, report_images: int, json_path: Path | None) -> None:
    """Seconds per image and step-graph size, INT8 vs fp32, ONNX Runtime on the CPU."""
    _, var, ecm = load_default()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "calibration"
        rows.append(measure("d16-proportioned", *d16_proportioned(), Path(tmp), repeats,
                            CalibOptions(samples=8, batch=4, cache=cache, report_images=4)))
        rows.append(measure("embedded default", var, ecm, Path(tmp), repeats,
                            CalibOptions(cache=cache, report_images=report_images)))
    click.echo("")
    click.echo(f"{'model':18}{'fp32 s/img':>11}{'INT8 s/img':>12}{'ratio':>8}{'Q/DQ kind':>10}"
               f"{'Q/DQ s/img':>12}{'ratio':>8}{'fp32 MB':>9}{'INT8 MB':>9}{'ratio':>8}{'Q/DQ MB':>9}{'ratio':>8}"
               f"{'INT8/fp32 per round':>21}")
    for r in rows:
        mb, kind = r["mb"], "W8A8" if r["report"]["activations"] == "int8" else "W8A16"
        click.echo(f"{r['model']:18}{r['fp32']:11.3f}{r['int8']:12.3f}{r['int8'] / r['fp32']:7.2f}x{kind:>10}"
                   f"{r['int8 Q/DQ']:12.3f}{r['int8 Q/DQ'] / r['fp32']:7.2f}x{mb['fp32']:9.1f}{mb['int8']:9.1f}"
                   f"{mb['int8'] / mb['fp32']:7.2f}x{mb['int8 Q/DQ']:9.1f}{mb['int8 Q/DQ'] / mb['fp32']:7.2f}x"
                   f"{r['median_ratio']['int8']:20.2f}x")
    rep = rows[-1]["report"]
    per = lambda xs: " ".join(f"{100 * x:.1f}" for x in xs)  # noqa: E731
    click.echo(f"embedded default, {rep['images']} held-out images: teacher-forced top-1 agreement with fp32 per scale:"
               f" CPU form [{per(rep['teacher_top1_cpu'])}] %, Q/DQ [{per(rep['teacher_top1_qdq'])}] %; Canny F1 "
               f"fp32 {rep['fidelity_fp32']:.4f}, INT8 {rep['fidelity_int8']:.4f} "
               f"({100 * rep['fidelity_change']:+.1f}%), Q/DQ {rep['fidelity_int8_qdq']:.4f}")
    click.echo("targets (d16-proportioned): INT8 s/img <= 0.67x fp32, INT8 step graph <= 0.3x; default: agreement "
               ">= 95% at every scale, F1 within 10%. INT8 = the CPU form ecm-run picks here (MatMulNBits); Q/DQ = "
               "the TensorRT graphs (W8A8 or, where that loses more than 5% at a scale of the calibration set, W8A16). "
               "Absolute times vary between machines.")
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
