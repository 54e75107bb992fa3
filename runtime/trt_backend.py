"""TensorRT backend: the plans of an export folder, one execution context each, cuda-python buffers.

The step plan holds one optimization profile per scale; a run selects the scale's profile, sets
the input shapes and points every tensor at its buffer, then enqueues on one CUDA stream. Buffers
live on the device from start to end: between scales nothing goes through the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .backend import Closing
from .device import DeviceArray, check, cudart, device_name
from .errors import ECMError
from .manifest import Manifest


def _rebuild_hint(folder: Path) -> str:
    return f"rebuild the plans on this machine: ecm-export --build-only {folder}"


class TrtBackend(Closing):
    """Runs ``var_ecm*.plan`` with TensorRT 10.3+ (name-based tensor API, ``execute_async_v3``)."""

    name, device = "TensorRT", "cuda"

    def __init__(self, folder: str | Path, manifest: Manifest | None = None):
        try:
            import tensorrt as trt
        except ImportError:
            raise ECMError("TensorRT is not installed (or this machine has no NVIDIA GPU): pip install "
                           "'ecm[gpu]' on the GPU machine, or run the ONNX export with --engine var_ecm.onnx") from None
        self.folder = Path(folder)
        m = self.manifest = manifest or Manifest.load(self.folder)
        if not m.tensorrt:
            raise ECMError(f"{self.folder} has no TensorRT plans yet; {_rebuild_hint(self.folder)}")
        rt = cudart()
        try:
            gpu, capability = device_name()
        except ECMError:
            raise ECMError("no usable CUDA GPU; run the ONNX export with --engine var_ecm.onnx instead") from None
        built = (m.tensorrt.get("version"), m.tensorrt.get("compute_capability"))
        if built != (trt.__version__, capability):
            raise ECMError(f"the plans in {self.folder} were built with TensorRT {built[0]} for compute capability "
                           f"{built[1]}, this is TensorRT {trt.__version__} on {gpu} ({capability}); "
                           f"{_rebuild_hint(self.folder)}")
        self.stream = check(rt.cudaStreamCreate())
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self.logger)
        self.engines, self.contexts, self.inputs = {}, {}, {}
        plans = {role: plan for role, plan in (m.tensorrt.get("plans") or {}).items()
                 if role in m.runtime_graphs()}
        if "step" not in plans:
            raise ECMError(f"the manifest in {self.folder} lists no step plan; {_rebuild_hint(self.folder)}")
        for role, plan in plans.items():
            path = self.folder / plan
            if not path.is_file():
                raise ECMError(f"{path} is missing; {_rebuild_hint(self.folder)}")
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ECMError(f"TensorRT cannot load {path} (truncated, corrupt, or built elsewhere); "
                               f"{_rebuild_hint(self.folder)}")
            self.engines[role] = engine
            self.contexts[role] = engine.create_execution_context()
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            self.inputs[role] = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self.profile = {role: -1 for role in self.contexts}
        self.in_flight: list[DeviceArray] = []  # uploads the queued work may still read

    # ------------------------------------------------------------------------------ buffers
    def alloc(self, shape: tuple[int, ...], dtype: str) -> DeviceArray:
        return DeviceArray.empty(shape, dtype)

    def upload(self, arr: np.ndarray) -> DeviceArray:
        buf = DeviceArray.from_host(arr)
        self.in_flight.append(buf)
        return buf

    def download(self, buf: DeviceArray) -> np.ndarray:
        self.synchronize()
        return buf.to_host()

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.stream))
        self.in_flight.clear()

    def close(self) -> None:
        """Finish the queued work, then release the contexts, engines and the CUDA stream (once)."""
        if self.stream is None:
            return
        self.synchronize()
        self.contexts.clear()  # contexts before their engines, engines before the runtime
        self.engines.clear()
        check(cudart().cudaStreamDestroy(self.stream))
        self.stream = None

    # ------------------------------------------------------------------------------ running
    def run(self, role: str, feeds: dict[str, Any], out: dict[str, Any], profile: int = 0) -> None:
        if role not in self.contexts:
            raise ECMError(f"this TensorRT backend has no {role} plan (closed, or an export without one)")
        ctx = self.contexts[role]
        if self.profile[role] != profile:
            ctx.set_optimization_profile_async(profile, self.stream)
            self.profile[role] = profile
        for name, buf in feeds.items():
            if not isinstance(buf, DeviceArray):
                buf = self.upload(np.ascontiguousarray(buf))
            if not ctx.set_input_shape(name, buf.shape):
                raise ECMError(f"input {name} of shape {buf.shape} is outside the {role} plan's profile {profile}; "
                               "export and build for this batch size")
            self._bind(ctx, name, buf)
        for name, buf in out.items():
            self._bind(ctx, name, buf)
        if not ctx.execute_async_v3(self.stream):
            raise ECMError(f"TensorRT failed to run the {role} plan; {_rebuild_hint(self.folder)}")

    @staticmethod
    def _bind(ctx: Any, name: str, buf: DeviceArray) -> None:
        if buf.ptr % 256 or not ctx.set_tensor_address(name, buf.ptr):  # TensorRT wants 256-byte alignment
            raise ECMError(f"TensorRT refused the buffer of {name} (address {buf.ptr:#x}, shape {buf.shape}); "
                           "this is a bug in ecm, please report it")
