"""One switch for the export stack's own log lines: our progress lines are what a user reads."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Inside the block, drop the log records at WARNING and below of every library (torch's exporter,
    onnxscript, ONNX Runtime's quantization tools) and polygraphy's messages below ERROR; errors still raise.

    Also undoes what one of those tools does when imported, ``logging.basicConfig`` at INFO on the root
    logger, after which every later export in the process would print ONNX IR records.
    """
    root = logging.getLogger()
    level, handlers, disabled = root.level, root.handlers[:], logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        from polygraphy.logger import G_LOGGER
    except ImportError:  # polygraphy is only needed for golden outputs and TensorRT builds
        G_LOGGER = None
    severity = G_LOGGER.module_severity if G_LOGGER is not None else None
    if G_LOGGER is not None:
        G_LOGGER.module_severity = G_LOGGER.ERROR
    try:
        yield
    finally:
        logging.disable(disabled)
        root.setLevel(level)
        root.handlers[:] = handlers
        if G_LOGGER is not None:
            G_LOGGER.module_severity = severity
