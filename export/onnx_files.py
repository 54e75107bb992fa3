"""ONNX files whose weights live beside them in ``<name>.onnx.data``, read and rewritten a tensor at a time.

:class:`Graph` holds a graph's structure in memory and reads each weight from disk only when it is
asked for; a rewrite gives initializers new values as functions, which run one by one while the
new file is written. A d30 step graph is 8 GB of fp32: quantizing or converting it this way never
holds more than one of its tensors.

We write the external data ourselves instead of through ``onnx.save(..., location=...)``: onnx
checks that location against the *current directory*, not the model's folder, so saving
``var_ecm.onnx`` anywhere failed whenever the working directory held an earlier export's
``var_ecm.onnx.data``. Here every path is the model's own, both files are written atomically,
and large tensors start at page-aligned offsets so that ONNX Runtime can map them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from ecm.runtime.errors import ECMError
from ecm.runtime.files import atomic_path
from onnx import helper, numpy_helper

#: Tensors smaller than this stay inside the .onnx file (as onnx's own default).
INLINE_BYTES = 1024
#: Tensors larger than this start at a multiple of ALIGN in the data file.
ALIGN_ABOVE, ALIGN = 1 << 20, 4096
Value = Callable[[], np.ndarray]


def data_path(path: str | Path) -> Path:
    """The external data file of an ONNX file: ``<path>.data``."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """An ONNX file with its external weights read into memory (for small graphs; see :class:`Graph`)."""
    return onnx.load(str(path), load_external_data=True)


def _external(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data} if t.data_location == onnx.TensorProto.EXTERNAL else {}


def _set_external(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Point ``t`` at ``length`` bytes at ``offset`` of ``location`` and drop its inline values."""
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(name)
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL


def save_onnx(model: onnx.ModelProto, path: str | Path, values: dict[str, Value] | None = None) -> None:
    """Write ``model`` to ``path`` with its initializers of INLINE_BYTES or more in ``<path>.data``.

    ``values`` gives initializers their data as functions, called one at a time while writing (the
    others carry theirs inline). Both files are written atomically; an earlier pair at ``path`` is
    replaced, wherever the current directory is. ``model``'s initializers end up pointing at the new
    data file.
    """
    path, values = Path(path), values or {}
    data = data_path(path)
    try:
        with atomic_path(data) as tmp, open(tmp, "wb") as f:
            offset = 0
            for t in model.graph.initializer:
                if t.name in values:
                    arr = np.asarray(values[t.name]())  # tobytes() writes C order whatever the layout
                    want = helper.tensor_dtype_to_np_dtype(t.data_type)
                    if arr.dtype != want or list(arr.shape) != list(t.dims):
                        raise ValueError(f"initializer {t.name} got {arr.dtype} {arr.shape}, its graph says "
                                         f"{want} {list(t.dims)}")
                    raw = arr.tobytes()
                elif _external(t):
                    raise ValueError(f"initializer {t.name} lives in another file and no value was given for it")
                else:
                    raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
                    if len(raw) < INLINE_BYTES:
                        continue
                if len(raw) > ALIGN_ABOVE and offset % ALIGN:
                    f.write(b"\0" * (ALIGN - offset % ALIGN))
                    offset += ALIGN - offset % ALIGN
                f.write(raw)
                _set_external(t, data.name, offset, len(raw))
                offset += len(raw)
        if not any(_external(t) for t in model.graph.initializer):
            data.unlink(missing_ok=True)  # a small graph keeps every weight inside
        with atomic_path(path) as tmp:
            tmp.write_bytes(model.SerializeToString())
    except ValueError as e:  # protobuf refuses a model description over 2 GB; a value of the wrong shape
        raise ECMError(f"cannot write {path}: {e}") from None


class Graph:
    """An ONNX graph whose weights stay on disk: the structure in memory, each initializer read when asked
    for, and rewrites that give initializers new values computed when the graph is saved."""

    def __init__(self, model: onnx.ModelProto, folder: Path, values: dict[str, Value] | None = None):
        self.model, self.folder = model, folder
        self._values = dict(values or {})

    @classmethod
    def open(cls, path: str | Path) -> Graph:
        path = Path(path)
        return cls(onnx.load(str(path), load_external_data=False), path.parent)

    def copy(self) -> Graph:
        """An independent copy of the structure; the values are shared (they only read)."""
        return Graph(copy.deepcopy(self.model), self.folder, self._values)

    @property
    def initializers(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.model.graph.initializer}

    def value(self, name: str) -> np.ndarray:
        """The data of initializer ``name``: its new value, or what the file holds."""
        return self.reader(name)()

    def reader(self, name: str) -> Value:
        """A function that reads initializer ``name``'s data as it is now, whatever later rewrites do to it."""
        if name in self._values:
            return self._values[name]
        t = self.initializers[name]
        ext = _external(t)
        if not ext:
            arr = numpy_helper.to_array(t)
            return lambda: arr
        dtype, dims = helper.tensor_dtype_to_np_dtype(t.data_type), list(t.dims)
        path, offset, length = self.folder / ext["location"], int(ext.get("offset", 0)), int(ext["length"])

        def read() -> np.ndarray:
            with open(path, "rb") as f:
                f.seek(offset)
                buf = bytearray(length)
                if f.readinto(buf) != length:
                    raise ECMError(f"{path} is truncated; re-export the graph")
            return np.frombuffer(buf, dtype=dtype).reshape(dims)

        return read

    def set_value(self, name: str, dtype: type | np.dtype, dims: tuple[int, ...], value: Value) -> None:
        """Make ``name`` an initializer of ``dtype`` and ``dims`` whose data ``value()`` gives when saved."""
        self.remove(name)
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims=list(dims))
        self.model.graph.initializer.append(t)
        self._values[name] = value

    def remove(self, name: str) -> None:
        for t in list(self.model.graph.initializer):
            if t.name == name:
                self.model.graph.initializer.remove(t)
        self._values.pop(name, None)

    def set_nodes(self, nodes: list[onnx.NodeProto]) -> None:
        """Replace the graph's nodes (a protobuf repeated field cannot be assigned)."""
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)

    def drop_unused(self) -> None:
        """Remove the initializers no node or output uses any more."""
        used = {i for n in self.model.graph.node for i in n.input} | {o.name for o in self.model.graph.output}
        for name in [t.name for t in self.model.graph.initializer if t.name not in used]:
            self.remove(name)

    def save(self, path: str | Path) -> None:
        """Write the graph with every weight it holds, reading or computing them one at a time."""
        model = copy.deepcopy(self.model)
        values = {t.name: (lambda n=t.name: self.value(n)) for t in model.graph.initializer
                  if t.name in self._values or _external(t)}
        save_onnx(model, path, values)
