"""What ``ecm-export --precision int8`` can be asked for, and its defaults (light: no torch, no onnx)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ecm.runtime.errors import ConfigError

SCOPES = ("linear", "all")  # what is quantized: see ecm.calibration.quantize
#: The inputs of the quantized layers in the TensorRT (Q/DQ) graphs: INT8 per tensor (W8A8), fp16 (W8A16,
#: weight-only), or auto: INT8 where it keeps MIN_AGREEMENT on the calibration set, else fp16.
ACTIVATIONS = ("auto", "int8", "fp16")
MIN_AGREEMENT = 0.95  # teacher-forced top-1 agreement with fp32 that auto asks of every scale
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength for the Q/DQ graphs; 0 turns smoothing off
DEFAULT_SAMPLES = 32  # generations recorded for calibration
DEFAULT_BATCH = 2  # generations per recorded batch: a d16 KV cache is 0.18 GB per image (fp32, with CFG)
REPORT_IMAGES = 8  # held-out images of the fp32-vs-INT8 report (d16: about 20 s each, eager and ONNX Runtime)


def check_scope(scope: str) -> None:
    """Refuse an unknown quantization scope in one line."""
    if scope not in SCOPES:
        raise ConfigError(f"unknown quantization scope {scope!r}; choose one of {', '.join(SCOPES)}")


def check_activations(activations: str) -> None:
    """Refuse an unknown activation precision in one line."""
    if activations not in ACTIVATIONS:
        raise ConfigError(f"unknown INT8 activation precision {activations!r}; choose one of {', '.join(ACTIVATIONS)}")


@dataclass
class CalibOptions:
    """How an INT8 export calibrates; the defaults are the CLI's."""

    source: Path | None = None  # condition images, or recorded calibration data; None: the procedural set
    samples: int = DEFAULT_SAMPLES
    batch: int = DEFAULT_BATCH
    scope: str = "linear"
    activations: str = "auto"  # see ACTIVATIONS
    min_agreement: float = MIN_AGREEMENT
    smooth: float = SMOOTH_ALPHA
    cache: Path | None = None  # where recordings are kept; None: <cache_dir>/calibration
    report_images: int = REPORT_IMAGES
