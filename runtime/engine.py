"""Opening an engine: an export folder or one of its files, with the backend that runs it.

``var_ecm.plan`` -> TensorRT, ``var_ecm.onnx`` or the folder -> ONNX Runtime; ``backend`` overrides.
With no engine at all, the embedded default model is exported to ONNX once into a cache folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import ECMError
from .loop import Backend
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


def cache_dir() -> Path:
    """Where the embedded default model's export is kept (``$XDG_CACHE_HOME/ecm`` or ``~/.cache/ecm``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ecm"


def default_engine(progress: Callable[[str], None] = print) -> Path:
    """The embedded default model exported to fp32 ONNX, made on first use (needs the export extra)."""
    from importlib import resources

    assets = resources.files("ecm") / "assets" / "default"
    digest = hashlib.sha256()
    for name in ("vqvae.safetensors", "var.safetensors", "ecm_canny.safetensors"):
        digest.update((assets / name).read_bytes())
    folder = cache_dir() / f"default-{digest.hexdigest()[:12]}-fp32"
    if (folder / MANIFEST_NAME).is_file():
        return folder
    try:
        from ecm.export.pipeline import ExportOptions, export_model

        from ecm.default_model import load_default
    except ImportError:
        raise ECMError("no --engine given, and exporting the embedded default model needs the export stack: "
                       "pip install 'ecm[train,export,cpu]', or pass --engine with an ecm-export folder") from None
    progress(f"exporting the embedded default model to ONNX once, into {folder} ...")
    _, var, ecm = load_default()
    # Exported beside the cache and renamed into place whole: a run starting meanwhile never sees a folder in the
    # middle of an export, and of two first runs at once, the one that finishes second uses the first one's.
    staging = folder.with_name(f".{folder.name}.{os.getpid()}")
    try:
        export_model(var, ecm, staging, ExportOptions(precision="fp32"), progress=progress)
        try:
            os.rename(staging, folder)
        except OSError as e:
            if not (folder / MANIFEST_NAME).is_file():
                raise ECMError(f"cannot move the default model's export into {folder} ({e.strerror or e}); "
                               "delete that folder and run again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
