"""The one exception type users see: a one-line message that names the problem and the fix."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class ECMError(Exception):
    """A user-facing error. CLIs print ``error: <message>`` and exit non-zero, never a traceback."""


class CheckpointError(ECMError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""


class ConfigError(ECMError):
    """An option or setting with a value the toolkit cannot use."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name if it has none), cut to ``limit``:
    how a third-party error (ONNX Runtime, TensorRT, torch, a plug-in) is quoted inside our one line."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def exit_on_error(fn: F) -> F:
    """Decorate a CLI entry point: an :class:`ECMError` becomes ``error: <message>`` and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ECMError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def not_built(command: str, issue: str) -> NoReturn:
    """Say plainly that a command does not exist yet, and fail."""
    raise ECMError(f"{command} is not built yet (planned in {issue}); see the README's roadmap")
