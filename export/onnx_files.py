"""Reading and writing ONNX files whose weights live beside them in ``<name>.onnx.data``.

We write the external data ourselves instead of through ``onnx.save(..., location=...)``: onnx
checks that location against the *current directory*, not the model's folder, so saving
``var_ecm.onnx`` anywhere failed whenever the working directory held an earlier export's
``var_ecm.onnx.data``. Here every path is the model's own, both files are written atomically,
and large tensors start at page-aligned offsets so that ONNX Runtime can map them.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from ecm.runtime.errors import ECMError
from ecm.runtime.files import atomic_path
from onnx import numpy_helper

#: Tensors smaller than this stay inside the .onnx file (as onnx's own default).
INLINE_BYTES = 1024
#: Tensors larger than this start at a multiple of ALIGN in the data file.
ALIGN_ABOVE, ALIGN = 1 << 20, 4096


def data_path(path: str | Path) -> Path:
    """The external data file of an ONNX file: ``<path>.data``."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """An ONNX file with its external weights read into memory."""
    return onnx.load(str(path), load_external_data=True)


def _raw(t: onnx.TensorProto) -> bytes:
    """A tensor's bytes in ONNX's little-endian raw layout, whichever field holds them."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        raise ValueError(f"initializer {t.name} still lives in an external file; load the model with its data")
    return t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()


def _set_external(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Point ``t`` at ``length`` bytes at ``offset`` of ``location`` and drop its inline values."""
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(name)
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL


def save_onnx(model: onnx.ModelProto, path: str | Path) -> None:
    """Write ``model`` to ``path`` with its initializers of INLINE_BYTES or more in ``<path>.data``.

    Both files are written atomically; an earlier pair at ``path`` is replaced, wherever the
    current directory is. ``model``'s initializers are rewritten to point at the data file.
    """
    path = Path(path)
    data = data_path(path)
    large = [t for t in model.graph.initializer if len(_raw(t)) >= INLINE_BYTES]
    try:
        if large:
            with atomic_path(data) as tmp, open(tmp, "wb") as f:
                offset = 0
                for t in large:
                    raw = _raw(t)
                    if len(raw) > ALIGN_ABOVE and offset % ALIGN:
                        f.write(b"\0" * (ALIGN - offset % ALIGN))
                        offset += ALIGN - offset % ALIGN
                    f.write(raw)
                    _set_external(t, data.name, offset, len(raw))
                    offset += len(raw)
        else:
            data.unlink(missing_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(model.SerializeToString())
    except ValueError as e:  # protobuf refuses a model description over 2 GB
        raise ECMError(f"cannot write {path}: {e}") from None
