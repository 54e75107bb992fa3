"""INT8 calibration from real generation trajectories (installed as ``ecm.calibration``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ecm.runtime.errors import not_built

if TYPE_CHECKING:
    from pathlib import Path


def export_int8(var: Any, ecm: Any, out_dir: Path, opts: Any, progress: Any) -> Any:
    """``ecm-export --precision int8``: calibrate, quantize to Q/DQ, verify (the INT8 issue)."""
    not_built("ecm-export --precision int8", "the INT8 calibration issue")
