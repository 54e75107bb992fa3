"""Checkpoint files read one tensor at a time: names, shapes and dtypes up front, values when asked for.

A d30 backbone is 8 GB of fp32. Loading it through ``torch.load`` and then copying or converting
it holds it twice; here each tensor is read from the file into memory of its own when the model
takes it, so building a model costs its size once, and nothing is memory-mapped behind it.
Two formats: safetensors (ours) and PyTorch's zip format (``torch.save``, the official VAR
releases), whose pickle is read with a restricted unpickler that only knows tensors and dicts.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecm.runtime.errors import CheckpointError

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_TORCH_STORAGES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of a checkpoint file: shape and dtype known, values read by :meth:`load` (each call reads)."""

    shape: torch.Size
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]

    def load(self) -> torch.Tensor:
        return self.read()


def read_tensor_file(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]] | None:
    """The tensors of a safetensors file or of a PyTorch zip file by name, and the file's string metadata;
    None for another format (PyTorch's legacy one)."""
    if path.suffix == ".safetensors":
        return _safetensors(path)
    if zipfile.is_zipfile(path):
        return _torch_zip(path), {}
    return None


def _read(path: Path, offset: int, length: int) -> bytearray:
    buf = bytearray(length)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(buf) != length:
            raise CheckpointError(f"{path} ends before its tensors do; it is truncated: re-download or re-save it")
    return buf


def _tensor(buf: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _safetensors(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    size = path.stat().st_size
    try:
        n = int.from_bytes(_read(path, 0, 8), "little")
        if n > size - 8:
            raise ValueError("its header is longer than the file")
        header = json.loads(_read(path, 8, n))
        meta = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, info in header.items():
            dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if not 0 <= begin <= end <= size - 8 - n:
                raise ValueError(f"tensor {name} lies outside the file")
            read = _reader(path, 8 + n + begin, end - begin, dtype, shape)
            tensors[name] = LazyTensor(torch.Size(shape), dtype, read)
    except (ValueError, KeyError, TypeError, CheckpointError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
                              "re-download or re-save it") from None
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _reader(path: Path, offset: int, length: int, dtype: torch.dtype,
            shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    return lambda: _tensor(_read(path, offset, length), dtype, shape)


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype


class _StateUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.save``d state dict into LazyTensors; any other object is refused (as weights_only)."""

    def __init__(self, file: Any, path: Path, prefix: str):
        super().__init__(file)
        self.path, self.prefix = path, prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _TORCH_STORAGES:
            return name
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict")

    def persistent_load(self, pid: Any) -> _Storage:
        kind, storage, key, _location, _numel = pid
        if kind != "storage" or storage not in _TORCH_STORAGES:
            raise pickle.UnpicklingError(f"unknown persistent object {kind} {storage}")
        return _Storage(str(key), _TORCH_STORAGES[storage])

    def _tensor(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any,
                **__: Any) -> LazyTensor:
        path, member = self.path, f"{self.prefix}data/{storage.key}"

        def read() -> torch.Tensor:
            with zipfile.ZipFile(path) as zf, zf.open(member) as f:
                buf = bytearray(zf.getinfo(member).file_size)
                f.readinto(buf)
            flat = _tensor(buf, storage.dtype, (len(buf) // storage.dtype.itemsize,))
            t = flat.as_strided(size, stride, offset)
            return t if t.numel() == flat.numel() else t.clone()  # a view of a larger storage keeps none of it

        return LazyTensor(torch.Size(size), storage.dtype, read)


def _torch_zip(path: Path) -> dict[str, LazyTensor]:
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
            prefix = pkl[: -len("data.pkl")]
            order = f"{prefix}byteorder"
            if order in zf.namelist() and zf.read(order).decode().strip() != "little":
                raise ValueError("a big-endian checkpoint")
            with zf.open(pkl) as f:
                obj = _StateUnpickler(f, path, prefix).load()
    except (StopIteration, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
            OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch state dict ({type(e).__name__}: {e}); it may be "
                              "truncated or corrupt: re-download it") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict()")
    bad = [k for k, v in obj.items() if not isinstance(v, LazyTensor)]
    if bad:
        raise CheckpointError(f"{path} is not a flat state dict (entry {bad[0]!r} is not a tensor); "
                              "extract the model's state dict first")
    return dict(obj)
