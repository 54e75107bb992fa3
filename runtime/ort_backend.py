"""ONNX Runtime backend: one session per graph of an export folder.

On the CPU, buffers are NumPy arrays and IOBinding points every output at its preallocated array
(the KV cache included), so nothing is allocated per image. With ``onnxruntime-gpu`` and the CUDA
provider, buffers are device memory owned by OrtValues and the same bindings keep every tensor on
the GPU between scales.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backend import Closing
from .device import DeviceArray, check, cudart
from .errors import ECMError, first_line
from .manifest import Manifest
from .memory import return_freed_memory

#: ONNX Runtime's names of the element types in manifests.
_ORT_TYPES = {"float32": "float", "float16": "float16", "int64": "int64", "uint8": "uint8"}


@dataclass
class Taps:
    """Tensors inside one graph to read after each of its runs (calibration statistics): ``graph`` is that role's
    graph with them added as outputs (beside the original, sharing its weights file); ``seen(name, value)``
    takes each one's value after every run."""

    role: str
    graph: Path
    names: list[str]
    seen: Callable[[str, np.ndarray], None]


def session_options(ort: Any, threads: int = 0, level: str = "ORT_ENABLE_ALL", arena: bool = False,
                    config: dict[str, str] | None = None) -> Any:
    """The session options every ONNX Runtime session of ours runs with (``ort`` is the imported module)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.log_severity_level = 4  # errors reach the user as exceptions, in one line: no log lines besides
    # Idle worker threads spinning for work cost more than they save between the many small ops of
    # a scale (measured: 1.9x slower on two shared cores); let them sleep.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Without ONNX Runtime's CPU arena, activations go back to the allocator after each call: the
    # same speed here, and a resident size close to weights + KV cache instead of about twice it.
    opts.enable_cpu_mem_arena = arena
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    return opts


class OrtBackend(Closing):
    """Runs the ONNX graphs listed in a manifest with ONNX Runtime.

    ``files`` runs other files for some roles (a quantized step graph checked against the rest of an
    fp32 export); ``taps`` reads tensors inside graphs after each run; ``roles`` loads only those graphs.
    """

    name = "ONNX Runtime"

    def __init__(self, folder: str | Path, manifest: Manifest | None = None, device: str = "cpu", threads: int = 0,
                 config: dict[str, str] | None = None, arena: bool = False, level: str = "ORT_ENABLE_ALL",
                 cpu_forms: bool = True, files: dict[str, Path] | None = None, taps: list[Taps] = (),
                 roles: tuple[str, ...] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ECMError("ONNX Runtime is not installed: pip install 'ecm[cpu]' (or 'ecm[gpu]' on a GPU)") from None
        self.ort = ort
        self.folder = Path(folder)
        self.manifest = manifest or Manifest.load(self.folder)
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ECMError("the CUDA provider of ONNX Runtime is not available: pip install 'ecm[gpu]' "
                           "(onnxruntime-gpu, without onnxruntime) or use --device cpu")
        self.device = device
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        opts = session_options(ort, threads, level, arena, config)
        if device == "cpu" and not arena:
            return_freed_memory()
        self.sessions = {}
        self.taps = {t.role: t for t in taps}
        paths = {role: self.folder / name  # an INT8 export's CPU forms run faster here than its Q/DQ graphs
                 for role, name in self.manifest.runtime_graphs(cpu=device == "cpu" and cpu_forms).items()}
        paths.update(files or {})
        paths.update({t.role: t.graph for t in taps})
        if roles is not None:  # runs that never decode (teacher forcing) need no decoder in memory
            paths = {role: path for role, path in paths.items() if role in roles}
        for role, path in paths.items():
            if not path.is_file():
                raise ECMError(f"{path} is missing; re-export with ecm-export")
            try:
                self.sessions[role] = ort.InferenceSession(str(path), opts, providers=providers)
            except Exception as e:  # ORT raises its own types for corrupt or truncated files
                raise ECMError(f"ONNX Runtime cannot load {path} ({first_line(e)}); "
                               "the file is damaged or from another export: re-export with ecm-export") from None
            if self.sessions[role].get_providers()[0] != providers[0]:
                raise ECMError(f"ONNX Runtime could not start {providers[0]} (CUDA libraries missing?); "
                               "fix the CUDA installation or use --device cpu")
            self._check_io(role, path)

    def _check_io(self, role: str, path: Path) -> None:
        """Refuse a graph whose tensors are not those the manifest describes (a file of another export)."""
        sess = self.sessions[role]
        want = self.manifest.io(role).tensors
        tapped = set(self.taps[role].names) if role in self.taps else set()
        got = {a.name: a for a in (*sess.get_inputs(), *sess.get_outputs()) if a.name not in tapped}
        problems = [f"it has no tensor {name!r}" for name in want if name not in got]
        problems += [f"it has an unknown tensor {name!r}" for name in got if name not in want]
        for name, (shape, dtype, _) in want.items():
            arg = got.get(name)
            if arg is not None and (arg.type != f"tensor({_ORT_TYPES[dtype]})" or len(arg.shape) != len(shape) or any(
                    isinstance(g, int) and g != w for g, w in zip(arg.shape, shape))):
                problems.append(f"{name} is {arg.type} {arg.shape}, the manifest says {dtype} {list(shape)}")
        if problems:
            raise ECMError(f"{path.name} does not fit the manifest beside it ({problems[0]}); the folder mixes files "
                           "of different exports: re-export with ecm-export")

    # ------------------------------------------------------------------------------ buffers
    def alloc(self, shape: tuple[int, ...], dtype: str) -> Any:
        return np.zeros(shape, dtype) if self.device == "cpu" else DeviceArray.empty(shape, dtype)

    def upload(self, arr: np.ndarray) -> Any:
        arr = np.ascontiguousarray(arr)
        return arr if self.device == "cpu" else DeviceArray.from_host(arr)

    def download(self, buf: Any) -> np.ndarray:
        return np.array(buf) if isinstance(buf, np.ndarray) else buf.to_host()

    def synchronize(self) -> None:
        """ONNX Runtime returns after the work is done; nothing to wait for."""

    def close(self) -> None:
        """Drop the sessions (their graphs, weights and kernels go with them)."""
        self.sessions.clear()

    # ------------------------------------------------------------------------------ running
    def run(self, role: str, feeds: dict[str, Any], out: dict[str, Any], profile: int = 0) -> None:
        if role not in self.sessions:
            raise ECMError(f"this ONNX Runtime backend has no {role} graph (closed, or an export without one)")
        sess = self.sessions[role]
        io = sess.io_binding()
        alive = []  # host inputs must outlive the run: ONNX Runtime reads them in place
        for name, buf in feeds.items():
            if isinstance(buf, np.ndarray):
                alive.append(np.ascontiguousarray(buf))
                io.bind_cpu_input(name, alive[-1])
            else:
                io.bind_input(name, "cuda", 0, buf.dtype, list(buf.shape), buf.ptr)
        taps = self.taps.get(role)
        for o in sess.get_outputs():
            if taps is not None and o.name in taps.names:
                io.bind_output(o.name, "cpu")  # ONNX Runtime allocates it
                continue
            buf = out[o.name]
            if isinstance(buf, np.ndarray):
                if not buf.flags.c_contiguous:
                    raise ValueError(f"output buffer {o.name} must be contiguous")
                io.bind_output(o.name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            else:
                io.bind_output(o.name, "cuda", 0, buf.dtype, list(buf.shape), buf.ptr)
        if self.device == "cuda":  # uploads and zeroing ran on the default stream; ONNX Runtime uses its own
            check(cudart().cudaDeviceSynchronize())
        try:
            sess.run_with_iobinding(io)
        except Exception as e:  # ORT's own error types: out of memory, a shape the graph refuses, ...
            raise ECMError(f"ONNX Runtime failed to run the {role} graph ({first_line(e)})") from None
        if taps is not None:
            names = [o.name for o in sess.get_outputs()]
            for name, value in zip(names, io.get_outputs()):
                if name in taps.names:
                    taps.seen(name, value.numpy())
