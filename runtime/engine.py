"""Opening an engine: an export folder or one of its files, with the backend that runs it.

``var_ecm.plan`` -> TensorRT, ``var_ecm.onnx`` or the folder -> ONNX Runtime; ``backend`` overrides.
"""

from __future__ import annotations

from pathlib import Path

from .backend import Backend
from .errors import ECMError
from .manifest import MANIFEST_NAME, Manifest

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def open_engine(path: str | Path, backend: str = "auto", device: str = "cpu",
                threads: int = 0) -> tuple[Manifest, Backend]:
    """The manifest of the export that ``path`` belongs to, and a backend running it."""
    path = Path(path)
    if not path.exists():
        raise ECMError(f"engine {path} does not exist; pass an ecm-export folder, its var_ecm.onnx or var_ecm.plan")
    folder = path if path.is_dir() else path.parent
    if not (folder / MANIFEST_NAME).is_file():
        raise ECMError(f"{folder} has no {MANIFEST_NAME} beside {path.name}; pass a folder written by ecm-export")
    m = Manifest.load(folder)
    if path.is_file() and path.suffix != ".plan":  # plans are checked by the TensorRT backend
        known = set(m.graphs.values())
        if path.name not in known:
            raise ECMError(f"{path.name} is not part of the export in {folder} (it holds {', '.join(sorted(known))})")
    if backend == "auto":
        backend = "tensorrt" if path.suffix == ".plan" else "onnxruntime"
    if backend == "tensorrt":
        from .trt_backend import TrtBackend

        return m, TrtBackend(folder, m)
    if backend == "onnxruntime":
        from .ort_backend import OrtBackend

        return m, OrtBackend(folder, m, device=device, threads=threads)
    raise ECMError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
