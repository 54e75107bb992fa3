"""What INT8 costs: an INT8 export against the eager fp32 model, on held-out conditions.

Per scale, the teacher-forced top-1 agreement of both INT8 forms with fp32 (every scale gets the
fp32 run's inputs, so an early difference does not decide the later scales); the Canny F1 of
fp32 and INT8 samples drawn with the same seeds; and a PNG of those samples side by side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ecm.export.verify import Reference, compare, eager_reference
from ecm.runtime.files import write_json
from ecm.runtime.images import canny_edges, grid, save_png, to_rgb_map, zoom
from ecm.runtime.manifest import Manifest

from ecm.adapters import ECM
from ecm.evaluate import edge_f1
from ecm.var import VAR

REPORT_NAME = "var_ecm.int8.json"
PICTURE_NAME = "var_ecm.int8.png"
SHOWN = 8  # rows of the side-by-side picture


@dataclass
class Int8Report:
    images: int
    scope: str
    activations: str  # of the Q/DQ graphs' quantized layers: int8 (W8A8) or fp16 (W8A16)
    teacher_top1_qdq: list[float]  # per scale: the Q/DQ graphs (TensorRT's), run by ONNX Runtime
    teacher_top1_cpu: list[float]  # per scale: the CPU forms that ecm-run uses on the CPU
    f1_fp32: float | None  # Canny F1 of the eager fp32 samples (None without control)
    f1_int8: float | None  # of the CPU forms' samples, same seeds
    f1_int8_qdq: float | None

    @property
    def worst_agreement(self) -> float:
        return min(self.teacher_top1_qdq + self.teacher_top1_cpu)

    @property
    def f1_change(self) -> float | None:
        """Relative change of Canny F1, INT8 (CPU form) vs fp32."""
        if self.f1_fp32 is None or self.f1_int8 is None:
            return None
        return self.f1_int8 / max(self.f1_fp32, 1e-9) - 1

    def summary(self) -> str:
        per = lambda xs: " ".join(f"{100 * x:.1f}" for x in xs)  # noqa: E731
        kind = "W8A8" if self.activations == "int8" else "W8A16"
        lines = [f"INT8 vs fp32 on {self.images} held-out images (scope {self.scope}): teacher-forced top-1 "
                 f"agreement per scale, Q/DQ ({kind}) [{per(self.teacher_top1_qdq)}] %, CPU form "
                 f"[{per(self.teacher_top1_cpu)}] %"]
        if self.f1_change is not None:
            lines.append(f"Canny F1: fp32 {self.f1_fp32:.4f}, INT8 {self.f1_int8:.4f} ({100 * self.f1_change:+.1f}%), "
                         f"INT8 Q/DQ {self.f1_int8_qdq:.4f}")
        return "\n".join(lines)


def mean_f1(images_NHW3: np.ndarray, cond_NHW3: np.ndarray) -> float:
    """Mean Canny F1 of generated images against their condition edge maps."""
    return float(np.mean([edge_f1(canny_edges(img), c[..., 0]) for img, c in zip(images_NHW3, cond_NHW3)]))


def int8_report(folder: Path, var: VAR, ecm: ECM | None, images: int = 16,
                ref: Reference | None = None) -> tuple[Int8Report, Path | None]:
    """Measure the INT8 export in ``folder``; writes the report and (with control) the picture there."""
    m = Manifest.load(folder)
    ref = ref or eager_reference(var, ecm, m, images)
    qdq, qdq_images = compare(folder, ref, cpu_forms=False)
    cpu, cpu_images = compare(folder, ref, cpu_forms=True)
    f1 = picture = None
    if ref.cond is not None:
        f1 = [mean_f1(x, ref.cond) for x in (ref.images, cpu_images, qdq_images)]
        rows = [[to_rgb_map(c[..., 0]), a, b] for c, a, b in zip(ref.cond[:SHOWN], ref.images, cpu_images)]
        picture = folder / PICTURE_NAME
        save_png(zoom(grid(rows), 3), picture)
    report = Int8Report(len(ref.labels), m.quantization["scope"], m.quantization["activations"],
                        [s.teacher_top1_agreement for s in qdq.scales],
                        [s.teacher_top1_agreement for s in cpu.scales], *(f1 or (None, None, None)))
    write_json({**asdict(report), "worst_agreement": report.worst_agreement, "f1_change": report.f1_change},
               folder / REPORT_NAME)
    return report, picture
