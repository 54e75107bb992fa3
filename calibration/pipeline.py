"""``ecm-export --precision int8`` as a function.

Export fp32 graphs, record (or reuse) eager generation trajectories, quantize the step graph and
the control encoder to symmetric INT8 Q/DQ (for TensorRT) and to the INT8 form ONNX Runtime's CPU
kernels run fastest, then verify both against the eager fp32 model and report what INT8 costs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from ecm.calibration.options import CalibOptions, check_scope
from ecm.calibration.quantize import prepare, quantize_cpu, quantize_qdq
from ecm.calibration.record import calibration_set, check_source, control_feeds, step_feeds
from ecm.calibration.report import int8_report
from ecm.export.pipeline import ExportOptions, ExportResult, Progress, export_model
from ecm.runtime.engine import cache_dir
from ecm.runtime.errors import ConfigError
from ecm.runtime.manifest import CPU_FORM, Manifest

from ecm.adapters import ECM
from ecm.var import VAR

QUANTIZED_ROLES = ("step", "control")  # the decoder stays fp32: convolutions over few pixels, cheap


def cpu_form_name(onnx_name: str) -> str:
    return onnx_name.removesuffix(".onnx") + ".cpu.onnx"


def export_int8(var: VAR, ecm: ECM | None, out_dir: str | Path, opts: ExportOptions,
                calib: CalibOptions | None = None, progress: Progress = print,
                bar: Callable[[Iterable[Any]], Iterable[Any]] = iter) -> ExportResult:
    """An INT8 export of ``var`` (+ ``ecm``) into ``out_dir``: complete and verified, or untouched."""
    out_dir = Path(out_dir)
    calib = calib or CalibOptions()
    cache = calib.cache or cache_dir() / "calibration"

    def quantize(tmp: Path, m: Manifest, progress: Progress) -> None:
        cset = calibration_set(var, ecm, m, calib.source, cache, calib.samples, calib.batch, bar, progress)
        fp32 = tmp / "fp32"  # the graphs as exported, for teacher forcing; gone before the export is committed
        fp32.mkdir()
        try:
            for name in m.graphs.values():
                for path in tmp.glob(name + "*"):
                    os.replace(path, fp32 / path.name)
            m.save(fp32)
            reference = Manifest.load(fp32)  # m itself gains the CPU forms below
            for role in QUANTIZED_ROLES:
                if role not in m.graphs:
                    continue
                name = m.graphs[role]

                def feeds(role: str = role) -> Iterator[dict[str, np.ndarray]]:
                    return step_feeds(cset, fp32, reference) if role == "step" else control_feeds(cset)

                progress(f"quantizing {name} with {cset.meta.samples} calibration generations ...")
                with tempfile.TemporaryDirectory(prefix="ecm-quant-") as work:
                    prep = prepare(fp32 / name, Path(work), calib.scope)
                    quantize_qdq(prep, tmp / name, feeds, calib.smooth)
                    quantize_cpu(prep, tmp / cpu_form_name(name))
                m.graphs[role + CPU_FORM] = cpu_form_name(name)
            for name in m.graphs.values():
                if not (tmp / name).exists():  # the decoder stays fp32
                    for path in fp32.glob(name + "*"):
                        os.replace(path, tmp / path.name)
        finally:
            shutil.rmtree(fp32, ignore_errors=True)
        m.save(tmp)
        progress(f"measuring INT8 against fp32 on {calib.report_images} held-out images ...")
        report, picture = int8_report(tmp, var, ecm, calib.scope, calib.report_images)
        progress(report.summary())
        if picture is not None:
            progress(f"fp32 | INT8 samples side by side: {out_dir / picture.name}")

    check_scope(calib.scope)
    check_source(calib.source)
    if opts.static_scales:
        raise ConfigError("--static-scales is not available for int8 exports; its per-scale graphs are "
                          "exported in fp32 or fp16 only")
    return export_model(var, ecm, out_dir, replace(opts, precision="int8"), progress, quantize=quantize)
