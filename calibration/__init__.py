"""INT8 calibration from real generation trajectories (installed as ``ecm.calibration``).

``export_int8`` (``ecm-export --precision int8``) lives in :mod:`ecm.calibration.pipeline`;
:mod:`~ecm.calibration.record` records calibration data, :mod:`~ecm.calibration.quantize` makes
the Q/DQ and CPU forms, :mod:`~ecm.calibration.report` measures them. Names are handed out
lazily, so reading the options (:mod:`~ecm.calibration.options`) needs neither torch nor onnx.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CalibOptions", "export_int8"]


def __getattr__(name: str) -> Any:
    if name == "CalibOptions":
        from ecm.calibration.options import CalibOptions

        return CalibOptions
    if name == "export_int8":
        from ecm.calibration.pipeline import export_int8

        return export_int8
    raise AttributeError(f"module 'ecm.calibration' has no attribute {name!r}")
