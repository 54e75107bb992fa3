"""What INT8 costs: an INT8 export against the eager fp32 model, on held-out conditions.

Per scale, the teacher-forced top-1 agreement of both INT8 forms with fp32 (every scale gets the
fp32 run's inputs, so an early difference does not decide the later scales); the control fidelity
(Canny: F1) of fp32 and INT8 samples drawn with the same seeds; and a PNG of those samples side by side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ecm.calibration.decoder import DecoderChoice
from ecm.export.verify import Reference, VerifyReport, compare
from ecm.runtime.controls import control_type
from ecm.runtime.files import write_json
from ecm.runtime.images import grid, save_png, zoom
from ecm.runtime.manifest import STEM, Manifest

REPORT_NAME = f"{STEM}.int8.json"
PICTURE_NAME = f"{STEM}.int8.png"
SHOWN = 8  # rows of the side-by-side picture


@dataclass
class Int8Report:
    images: int
    scope: str
    activations: str  # of the Q/DQ graphs' quantized layers: int8 (W8A8) or fp16 (W8A16)
    teacher_top1_qdq: list[float]  # per scale: the Q/DQ graphs (TensorRT's), run by ONNX Runtime
    teacher_top1_cpu: list[float]  # per scale: the CPU forms that ecm-run uses on the CPU
    metric: str | None  # the control's fidelity metric (Canny: F1); None without control or extractor
    fidelity_fp32: float | None  # of the eager fp32 samples to their conditions
    fidelity_int8: float | None  # of the CPU forms' samples, same seeds
    fidelity_int8_qdq: float | None
    cpu: str = "blockwise"  # the CPU forms' kind: dynamic or blockwise (calibration.quantize)
    decoder: DecoderChoice | None = None  # the decoder's INT8 CPU form (None: it stays fp32 on a CPU)
    decoder_psnr: float | None = None  # that form's PSNR against fp32 over these images, on their latents, dB

    @property
    def worst_agreement(self) -> float:
        return min(self.teacher_top1_qdq + self.teacher_top1_cpu)

    @property
    def fidelity_change(self) -> float | None:
        """Relative change of the control fidelity, INT8 (CPU form) vs fp32."""
        if self.fidelity_fp32 is None or self.fidelity_int8 is None:
            return None
        if self.fidelity_int8 == self.fidelity_fp32:
            return 0.0
        return self.fidelity_int8 / max(self.fidelity_fp32, 1e-9) - 1

    def summary(self) -> str:
        per = lambda xs: " ".join(f"{100 * x:.1f}" for x in xs)  # noqa: E731
        kind = "W8A8" if self.activations == "int8" else "W8A16"
        lines = [f"INT8 vs fp32 on {self.images} held-out images (scope {self.scope}): teacher-forced top-1 "
                 f"agreement per scale, Q/DQ ({kind}) [{per(self.teacher_top1_qdq)}] %, CPU form "
                 f"[{per(self.teacher_top1_cpu)}] %"]
        if self.fidelity_change is not None:
            lines.append(f"control {self.metric}: fp32 {self.fidelity_fp32:.4f}, INT8 {self.fidelity_int8:.4f} "
                         f"({100 * self.fidelity_change:+.1f}%), INT8 Q/DQ {self.fidelity_int8_qdq:.4f}")
        d = self.decoder
        lines.append(f"CPU forms: {self.cpu}; decoder on a CPU: " + (
            "fp32" if d is None else f"INT8 in {d.quantized} of {d.convolutions} convolutions "
            f"({100 * d.flops_share:.0f}% of their FLOPs), PSNR against fp32 {self.decoder_psnr:.1f} dB"))
        return "\n".join(lines)


def mean_fidelity(m: Manifest, images_NHW3: np.ndarray, cond_NHW3: np.ndarray) -> float:
    """Mean fidelity of generated images to their conditions, in the control's metric (Canny: F1)."""
    kind = control_type(m.control.type)
    return float(np.mean([kind.score(img, c, m.control) for img, c in zip(images_NHW3, cond_NHW3)]))


def int8_report(folder: Path, ref: Reference, decoder: DecoderChoice | None = None,
                decoder_psnr: float | None = None) -> tuple[Int8Report, Path | None, VerifyReport]:
    """Measure the INT8 export in ``folder`` against the eager generations ``ref``; writes the report and
    (with control) the picture there. ``decoder``, ``decoder_psnr``: what became of the decoder. Also
    returns the comparison of the CPU forms with the eager model (the export's verification)."""
    m = Manifest.load(folder)
    qdq, qdq_images = compare(folder, ref, cpu_forms=False)
    cpu, cpu_images = compare(folder, ref, cpu_forms=True)
    fidelity, picture = [None] * 4, None
    if ref.cond is not None:
        if control_type(m.control.type).extractor is not None:
            scores = [mean_fidelity(m, x, ref.cond) for x in (ref.images, cpu_images, qdq_images)]
            fidelity = [control_type(m.control.type).metric, *scores]
        rows = [[c, a, b] for c, a, b in zip(ref.cond[:SHOWN], ref.images, cpu_images)]
        picture = folder / PICTURE_NAME
        save_png(zoom(grid(rows), 3), picture)
    report = Int8Report(len(ref.labels), m.quantization["scope"], m.quantization["activations"],
                        [s.teacher_top1_agreement for s in qdq.scales],
                        [s.teacher_top1_agreement for s in cpu.scales], *fidelity,
                        m.quantization.get("cpu", "blockwise"), decoder, decoder_psnr)
    write_json({**asdict(report), "worst_agreement": report.worst_agreement,
                "fidelity_change": report.fidelity_change},
               folder / REPORT_NAME)
    return report, picture, cpu
