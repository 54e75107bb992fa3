"""ONNX Runtime backend: one session per graph of an export folder (CPU, or CUDA when installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ECMError
from .loop import Arrays
from .manifest import Manifest


class OrtBackend:
    """Runs the graphs listed in a manifest with ONNX Runtime; outputs can land in given arrays."""

    def __init__(self, folder: str | Path, manifest: Manifest | None = None, providers: list[str] | None = None,
                 threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ECMError("ONNX Runtime is not installed; pip install 'ecm[cpu]' (or 'ecm[gpu]')") from None
        self.folder = Path(folder)
        self.manifest = manifest or Manifest.load(self.folder)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        providers = providers or ["CPUExecutionProvider"]
        self.sessions = {}
        for role in ("step", "control", "decoder"):
            name = self.manifest.graphs.get(role)
            if name is None:
                continue
            path = self.folder / name
            if not path.is_file():
                raise ECMError(f"{path} is missing; re-export with ecm-export")
            try:
                self.sessions[role] = ort.InferenceSession(str(path), opts, providers=providers)
            except Exception as e:  # ORT raises its own exception types for corrupt or truncated files
                raise ECMError(f"ONNX Runtime cannot load {path} ({str(e).splitlines()[0][:200]}); "
                               "re-export with ecm-export") from None

    def run(self, role: str, feeds: Arrays, out: Arrays | None = None) -> Arrays:
        sess = self.sessions[role]
        io = sess.io_binding()
        for name, arr in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(arr))
        out = out or {}
        names = [o.name for o in sess.get_outputs()]
        for name in names:
            if name in out:
                buf = out[name]
                if not buf.flags.c_contiguous:
                    raise ValueError(f"output buffer {name} must be contiguous")
                io.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            else:
                io.bind_output(name, "cpu")
        sess.run_with_iobinding(io)
        values = io.get_outputs()
        return {name: out[name] if name in out else value.numpy() for name, value in zip(names, values)}
