"""``ecm-export --precision int8`` as a function.

Export fp32 graphs, record (or reuse) eager generation trajectories, quantize the step graph and
the control encoder to symmetric INT8 Q/DQ for TensorRT (W8A8 where it keeps the calibration
set's tokens, else weight-only W8A16) and to the INT8 form ONNX Runtime's CPU kernels run
fastest, then verify both against the eager fp32 model and report what INT8 costs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ecm.calibration.options import CalibOptions, check_activations, check_scope
from ecm.calibration.quantize import prepare, quantize_cpu, quantize_qdq, quantize_weights
from ecm.calibration.record import CalibrationSet, calibrate, calibration_set, check_source, teacher_agreement
from ecm.calibration.report import int8_report
from ecm.export.pipeline import ExportOptions, ExportResult, ModelSource, Progress, export_model
from ecm.export.verify import Reference, eager_reference
from ecm.runtime.errors import ConfigError
from ecm.runtime.files import cache_dir
from ecm.runtime.manifest import CPU_FORM, Manifest, graph_file

from ecm.model.adapters import ECM
from ecm.model.var import VAR

WEIGHT_ONLY_OPSET = 19  # DequantizeLinear with fp16 scales
QUANTIZED_ROLES = ("step", "control")  # the decoder stays fp32: convolutions over few pixels, cheap


def choose_activations(agreement: list[float], minimum: float, progress: Progress) -> str:
    """INT8 activations if every scale keeps ``minimum`` teacher-forced agreement, else fp16 (weight-only)."""
    per = " ".join(f"{100 * a:.1f}" for a in agreement)
    if min(agreement) >= minimum:
        progress(f"W8A8 keeps [{per}] % top-1 agreement on the calibration set: INT8 activations")
        return "int8"
    progress(f"W8A8 keeps only [{per}] % top-1 agreement on the calibration set (< {100 * minimum:.0f}% at some "
             "scale): weight-only INT8 (W8A16) instead")
    return "fp16"


class Int8Quantizer:
    """The INT8 part of an export (:class:`ecm.export.pipeline.Quantizer`): calibration generations and the
    report's reference are made with the eager models, then the exported fp32 graphs are rewritten."""

    def __init__(self, calib: CalibOptions, bar: Callable[[Iterable[Any]], Iterable[Any]] = iter):
        self.calib, self.bar = calib, bar
        self.cset: CalibrationSet | None = None
        self.reference: Reference | None = None

    def record(self, var: VAR, ecm: ECM | None, m: Manifest, progress: Progress) -> None:
        calib = self.calib
        if calib.activations != "fp16":
            cache = calib.cache or cache_dir() / "calibration"
            self.cset = calibration_set(var, ecm, m, calib.source, cache, calib.samples, calib.batch, self.bar,
                                        progress)
        progress(f"generating {calib.report_images} eager reference images for the INT8 report ...")
        self.reference = eager_reference(var, ecm, m, calib.report_images)

    def apply(self, tmp: Path, m: Manifest, progress: Progress) -> None:
        calib, cset = self.calib, self.cset
        fp32 = tmp / "fp32"  # the graphs as exported, for teacher forcing; gone before the export is committed
        fp32.mkdir()
        try:
            for name in m.graphs.values():
                for path in tmp.glob(name + "*"):
                    os.replace(path, fp32 / path.name)
            m.save(fp32)
            reference = Manifest.load(fp32)  # m itself gains the CPU forms below
            roles = [role for role in QUANTIZED_ROLES if role in m.graphs]
            prepared = {role: prepare(fp32 / m.graphs[role], calib.scope) for role in roles}
            activations = calib.activations
            if activations != "fp16":
                progress(f"calibrating: the fp32 graphs teacher-forced along {cset.meta.samples} recorded "
                         "generations ...")
                found = calibrate(cset, fp32, reference, {role: prepared[role].activations for role in roles})
                for role in roles:
                    progress(f"quantizing {m.graphs[role]} (W8A8) ...")
                    quantize_qdq(prepared[role], tmp / m.graphs[role], found.absmax[role], calib.smooth)
                if activations == "auto":  # the step graph's agreement decides the encoder's form too
                    agreement = teacher_agreement(cset, fp32, reference, tmp / m.graphs["step"], found.top1)
                    activations = choose_activations(agreement, calib.min_agreement, progress)
            for role in roles:
                if activations == "fp16":
                    progress(f"quantizing {m.graphs[role]} (W8A16, weight-only) ...")
                    quantize_weights(prepared[role], tmp / m.graphs[role])
                progress(f"writing the CPU form of {m.graphs[role]} ...")
                quantize_cpu(prepared[role], tmp / graph_file(role + CPU_FORM))
                m.graphs[role + CPU_FORM] = graph_file(role + CPU_FORM)
            for name in m.graphs.values():
                if not (tmp / name).exists():  # the decoder stays fp32
                    for path in fp32.glob(name + "*"):
                        os.replace(path, tmp / path.name)
        finally:
            shutil.rmtree(fp32, ignore_errors=True)
        m.quantization = {"scope": calib.scope, "activations": activations}
        m.save(tmp)
        progress(f"measuring INT8 against fp32 on {calib.report_images} held-out images ...")
        report, picture = int8_report(tmp, self.reference)
        progress(report.summary())
        if picture is not None:
            progress(f"fp32 | INT8 samples side by side: {picture.name} in the export folder")


def export_int8(source: ModelSource, out_dir: str | Path, opts: ExportOptions, calib: CalibOptions | None = None,
                progress: Progress = print, bar: Callable[[Iterable[Any]], Iterable[Any]] = iter) -> ExportResult:
    """An INT8 export of ``source``'s models into ``out_dir``: complete and verified, or untouched."""
    calib = calib or CalibOptions()
    check_scope(calib.scope)
    check_activations(calib.activations)
    if calib.source is not None and calib.activations == "fp16":
        raise ConfigError("--calib has no use with --int8-activations fp16 (weight-only INT8 needs no calibration); "
                          "leave it out or pick int8 or auto")
    if calib.activations != "int8" and opts.opset < WEIGHT_ONLY_OPSET:
        raise ConfigError(f"weight-only INT8 (W8A16) needs opset {WEIGHT_ONLY_OPSET} or later for its fp16 scales; "
                          f"export with --opset {WEIGHT_ONLY_OPSET} or later, or use --int8-activations int8")
    check_source(calib.source)
    if opts.static_scales:
        raise ConfigError("--static-scales is not available for int8 exports; its per-scale graphs are "
                          "exported in fp32 or fp16 only")
    return export_model(source, out_dir, replace(opts, precision="int8"), progress, Int8Quantizer(calib, bar))
