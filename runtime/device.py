"""CUDA device memory through cuda-python: typed views that the GPU backends bind by pointer.

A :class:`DeviceArray` is a pointer, a shape and a dtype over memory that one allocation owns;
``rows`` and ``view`` make sub-views without copies, which is how every scale's keys and values
land in their slice of one preallocated cache.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ECMError


def cudart() -> Any:
    """The CUDA runtime bindings of cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise ECMError("cuda-python is not installed: pip install 'ecm[gpu]'") from None
    return runtime


def check(result: Any) -> Any:
    """Unpack a cuda-python call's (error, *values); raise on an error."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        raise ECMError(f"CUDA error {err.name if hasattr(err, 'name') else err}; check the GPU and driver")
    return values[0] if len(values) == 1 else tuple(values)


class Allocation:
    """Owns one cudaMalloc block; freed when garbage-collected."""

    def __init__(self, nbytes: int):
        self.ptr = check(cudart().cudaMalloc(max(nbytes, 1)))
        check(cudart().cudaMemset(self.ptr, 0, max(nbytes, 1)))

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown the driver frees it anyway
            cudart().cudaFree(self.ptr)


@dataclass
class DeviceArray:
    """A typed window of device memory; ``owner`` keeps the allocation alive."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    owner: Any

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: str | np.dtype) -> DeviceArray:
        dtype = np.dtype(dtype)
        owner = Allocation(math.prod(shape) * dtype.itemsize)
        return cls(int(owner.ptr), tuple(shape), dtype, owner)

    @classmethod
    def from_host(cls, arr: np.ndarray) -> DeviceArray:
        arr = np.ascontiguousarray(arr)
        out = cls.empty(arr.shape, arr.dtype)
        out.copy_from(arr)
        return out

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> DeviceArray:
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        return DeviceArray(self.ptr + start * row, (stop - start, *self.shape[1:]), self.dtype, self.owner)

    def view(self, shape: tuple[int, ...]) -> DeviceArray:
        if math.prod(shape) > math.prod(self.shape):
            raise ValueError(f"view {shape} is larger than the buffer {self.shape}")
        return DeviceArray(self.ptr, tuple(shape), self.dtype, self.owner)

    def copy_from(self, arr: np.ndarray) -> None:
        rt = cudart()
        check(rt.cudaMemcpy(self.ptr, arr.ctypes.data, self.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice))

    def to_host(self) -> np.ndarray:
        rt = cudart()
        out = np.empty(self.shape, self.dtype)
        check(rt.cudaMemcpy(out.ctypes.data, self.ptr, self.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return out

    def zero(self) -> None:
        check(cudart().cudaMemset(self.ptr, 0, self.nbytes))


def device_name() -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of device 0."""
    props = check(cudart().cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.strip("\x00"), f"{props.major}.{props.minor}"
