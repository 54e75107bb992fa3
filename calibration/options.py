"""What ``ecm-export --precision int8`` can be asked for, and its defaults (light: no torch, no onnx)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ecm.runtime.errors import ConfigError

SCOPES = ("linear", "all")  # what is quantized: see ecm.calibration.quantize
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength for the Q/DQ graphs; 0 turns smoothing off
DEFAULT_SAMPLES = 32  # generations recorded for calibration
DEFAULT_BATCH = 8  # generations per recorded batch
REPORT_IMAGES = 16  # held-out images of the fp32-vs-INT8 report


def check_scope(scope: str) -> None:
    """Refuse an unknown quantization scope in one line."""
    if scope not in SCOPES:
        raise ConfigError(f"unknown quantization scope {scope!r}; choose one of {', '.join(SCOPES)}")


@dataclass
class CalibOptions:
    """How an INT8 export calibrates; the defaults are the CLI's."""

    source: Path | None = None  # condition images, or recorded calibration data; None: the procedural set
    samples: int = DEFAULT_SAMPLES
    batch: int = DEFAULT_BATCH
    scope: str = "linear"
    smooth: float = SMOOTH_ALPHA
    cache: Path | None = None  # where recordings are kept; None: <cache_dir>/calibration
    report_images: int = REPORT_IMAGES
