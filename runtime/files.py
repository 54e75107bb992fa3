"""Writing files so that a crash, a full disk or Ctrl-C never leaves a half-written one behind."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ECMError


def readable(path: str | Path) -> None:
    """Give ``path`` the permissions a plain new file gets (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A crash, a full disk or an exception leaves any previous file untouched and no partial file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ECMError(f"cannot write {path}: {e.strerror or e}; choose a writable location") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # on disk before it takes the final name
            os.fsync(f.fileno())
        readable(tmp_path)  # mkstemp's 0600 would hide checkpoints from other users
        os.replace(tmp_path, path)
    except OSError as e:
        raise ECMError(f"cannot write {path}: {e.strerror or e}; free some disk space or choose "
                       "another location (nothing was overwritten)") from None
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def file_sha256(*paths: str | Path) -> str:
    """sha256 (hex) of the bytes of ``paths``, one after the other, read in chunks."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """ecm's cache (``$XDG_CACHE_HOME/ecm`` or ``~/.cache/ecm``): the default model's export, calibration data."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ecm"
