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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ecm.calibration.decoder import MIN_PSNR, DecoderChoice, decoder_psnr, half_decoder, quantize_decoder
from ecm.calibration.options import CalibOptions, check_activations, check_scope
from ecm.calibration.quantize import (
    Prepared,
    prepare,
    quantize_cpu,
    quantize_dynamic,
    quantize_qdq,
    quantize_weights,
    smoothing_scales,
)
from ecm.calibration.record import (
    Calibration,
    CalibrationSet,
    calibrate,
    calibration_set,
    check_source,
    teacher_agreement,
)
from ecm.calibration.report import int8_report
from ecm.export.pipeline import ExportOptions, ExportResult, ModelSource, Progress, export_model
from ecm.export.verify import Reference, VerifyReport, eager_reference
from ecm.runtime.errors import ConfigError
from ecm.runtime.files import cache_dir
from ecm.runtime.manifest import CPU_FORM, Manifest, graph_file

from ecm.model.adapters import ControlMix
from ecm.model.var import VAR

WEIGHT_ONLY_OPSET = 19  # DequantizeLinear with fp16 scales
QUANTIZED_ROLES = ("step", "control")  # the linear layers; the decoder has forms of its own (calibration.decoder)
DECODER_CHECK = 4  # calibration latents that check the decoder's PSNR; the others set its ranges


@dataclass(frozen=True)
class Choice:
    """A faster form tried first and the safer one it falls back to: names and what they are called in the output."""

    form: str
    faster: tuple[str, str]  # (value, words)
    safer: tuple[str, str]


W8A8 = Choice("W8A8", ("int8", "INT8 activations"), ("fp16", "weight-only INT8 (W8A16) instead"))
DYNAMIC = Choice("the dynamic CPU form", ("dynamic", "kept"), ("blockwise", "the blockwise CPU form instead"))


def choose(agreement: list[float], minimum: float, choice: Choice, progress: Progress) -> str:
    """The faster form if every scale keeps ``minimum`` teacher-forced agreement on the calibration set, else
    the safer one."""
    per = " ".join(f"{100 * a:.1f}" for a in agreement)
    if min(agreement) >= minimum:
        progress(f"{choice.form} keeps [{per}] % top-1 agreement on the calibration set: {choice.faster[1]}")
        return choice.faster[0]
    progress(f"{choice.form} keeps only [{per}] % top-1 agreement on the calibration set (< {100 * minimum:.0f}% "
             f"at some scale): {choice.safer[1]}")
    return choice.safer[0]


class Int8Quantizer:
    """The INT8 part of an export (:class:`ecm.export.pipeline.Quantizer`): calibration generations and the
    report's reference are made with the eager models, then the exported fp32 graphs are rewritten."""

    def __init__(self, calib: CalibOptions, bar: Callable[[Iterable[Any]], Iterable[Any]] = iter):
        self.calib, self.bar = calib, bar
        self.cset: CalibrationSet | None = None
        self.reference: Reference | None = None

    def record(self, var: VAR, mix: ControlMix | None, m: Manifest, progress: Progress) -> None:
        calib = self.calib
        if calib.activations != "fp16":
            cache = calib.cache or cache_dir() / "calibration"
            self.cset = calibration_set(var, mix, m, calib.source, cache, calib.samples, calib.batch, self.bar,
                                        progress)
        progress(f"generating {calib.report_images} eager reference images for the INT8 report ...")
        self.reference = eager_reference(var, mix, m, calib.report_images)

    def apply(self, tmp: Path, m: Manifest, progress: Progress) -> VerifyReport:
        calib, cset = self.calib, self.cset
        fp32 = tmp / "fp32"  # the graphs as exported, for teacher forcing; gone before the export is committed
        fp32.mkdir()
        try:
            for name in m.graphs.values():
                for path in tmp.glob(name + "*"):
                    os.replace(path, fp32 / path.name)
            for role, name in m.graphs.items():  # what INT8 leaves as it is: the image encoder, further controls
                if role not in QUANTIZED_ROLES and role != "decoder":
                    for path in fp32.glob(name + "*"):
                        shutil.copy2(path, tmp / path.name)
            m.save(fp32)
            reference = Manifest.load(fp32)  # m itself gains the CPU forms below
            roles = [role for role in QUANTIZED_ROLES if role in m.graphs]
            prepared = {role: prepare(fp32 / m.graphs[role], calib.scope) for role in roles}
            activations, found = calib.activations, None
            if activations != "fp16":
                progress(f"calibrating: the fp32 graphs teacher-forced along {cset.meta.samples} recorded "
                         "generations ...")
                found = calibrate(cset, fp32, reference, {role: prepared[role].activations for role in roles})
                for role in roles:
                    progress(f"quantizing {m.graphs[role]} (W8A8) ...")
                    quantize_qdq(prepared[role], tmp / m.graphs[role], found.absmax[role], calib.smooth)
                if activations == "auto":  # the step graph's agreement decides the encoder's form too
                    agreement = teacher_agreement(cset, fp32, reference, tmp / m.graphs["step"], found.top1)
                    activations = choose(agreement, calib.min_agreement, W8A8, progress)
            if activations == "fp16":
                for role in roles:
                    progress(f"quantizing {m.graphs[role]} (W8A16, weight-only) ...")
                    quantize_weights(prepared[role], tmp / m.graphs[role])
            cpu = self.cpu_forms(prepared, found, fp32, reference, tmp, m, progress)
            decoder, held_out_psnr = self.decoder_forms(fp32, tmp, m, found, progress)
        finally:
            shutil.rmtree(fp32, ignore_errors=True)
        m.quantization = {"scope": calib.scope, "activations": activations, "cpu": cpu,
                          "decoder_cpu": "int8" if decoder else "fp32"}
        m.save(tmp)
        progress(f"measuring INT8 against fp32 on {calib.report_images} held-out images ...")
        report, picture, checked = int8_report(tmp, self.reference, decoder, held_out_psnr)
        progress(report.summary())
        if picture is not None:
            progress(f"fp32 | INT8 samples side by side: {picture.name} in the export folder")
        return checked

    def decoder_forms(self, fp32: Path, tmp: Path, m: Manifest, found: Calibration | None,
                      progress: Progress) -> tuple[DecoderChoice | None, float | None]:
        """Write the decoder's fp16 form (TensorRT) and, given calibration latents, its INT8 CPU form; returns
        what the CPU form quantized (None: it stays fp32) and its PSNR on the report's held-out latents."""
        progress("writing the decoder's fp16 form (for TensorRT) ...")
        src = fp32 / m.graphs["decoder"]
        half_decoder(src, tmp / m.graphs["decoder"])
        if found is None:
            return None, None
        progress(f"writing the decoder's INT8 CPU form (as many convolutions as keep {MIN_PSNR:.0f} dB) ...")
        calib, check = found.latents[:-DECODER_CHECK] or found.latents, found.latents[-DECODER_CHECK:]
        choice = quantize_decoder(src, tmp / graph_file("decoder_cpu"), calib, check)
        if not choice.quantized:
            return None, None
        m.graphs["decoder_cpu"] = graph_file("decoder_cpu")
        held_out = [f for g in self.reference.chunks for f in g.f_hat.numpy()]
        return choice, decoder_psnr(src, tmp / m.graphs["decoder_cpu"], held_out)

    def cpu_forms(self, prepared: dict[str, Prepared], found: Calibration | None, fp32: Path, reference: Manifest,
                  tmp: Path, m: Manifest, progress: Progress) -> str:
        """Write the CPU forms of the quantized graphs; returns their kind. The dynamic kind (smoothed by the
        calibration data) where it keeps the minimum agreement on the calibration set, else the blockwise one."""
        kind = "blockwise"
        if found is not None:
            for role, prep in prepared.items():
                progress(f"writing the dynamic CPU form of {m.graphs[role]} ...")
                smoothing = smoothing_scales(prep, found.absmax[role], self.calib.smooth) if self.calib.smooth else {}
                quantize_dynamic(prep, tmp / graph_file(role + CPU_FORM), smoothing)
            agreement = teacher_agreement(self.cset, fp32, reference, tmp / graph_file("step" + CPU_FORM), found.top1)
            kind = choose(agreement, self.calib.min_agreement, DYNAMIC, progress)
        for role, prep in prepared.items():
            if kind == "blockwise":
                progress(f"writing the blockwise CPU form of {m.graphs[role]} ...")
                quantize_cpu(prep, tmp / graph_file(role + CPU_FORM))
            m.graphs[role + CPU_FORM] = graph_file(role + CPU_FORM)
        return kind


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
