"""What the scale loop needs of a backend, and the lifecycle every backend shares."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Backend(Protocol):
    """Runs the graphs of one export on buffers it allocates (host arrays or device memory)."""

    name: str  # "ONNX Runtime", "TensorRT"
    device: str  # "cpu", "cuda"

    def alloc(self, shape: tuple[int, ...], dtype: str) -> Any:
        """A zeroed buffer."""
        ...

    def upload(self, arr: np.ndarray) -> Any:
        """A buffer holding ``arr`` (the array itself on the CPU)."""
        ...

    def download(self, buf: Any) -> np.ndarray:
        """A host copy of ``buf``."""
        ...

    def synchronize(self) -> None:
        """Wait until the work queued so far has finished."""
        ...

    def run(self, role: str, feeds: dict[str, Any], out: dict[str, Any], profile: int = 0) -> None:
        """Run graph ``role`` ('step', 'control', 'decoder') with optimization profile ``profile``,
        writing every output into the buffer of that name in ``out``."""
        ...

    def close(self) -> None:
        """Release what the backend holds (sessions, engines, streams); it cannot run afterwards."""
        ...


class Closing:
    """Context-manager use of a backend, like polygraphy's runners: ``with OrtBackend(folder) as backend: ...``
    closes it on the way out, whatever happens inside."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
