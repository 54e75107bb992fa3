"""Resident memory of this process, and keeping it close to what the runtime really holds."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from pathlib import Path

from .manifest import Manifest

_M_MMAP_THRESHOLD = -3


def return_freed_memory() -> None:
    """Serve large allocations (>= 1 MiB) from their own mappings, so freeing returns them to the OS.

    glibc otherwise raises this threshold as buffers are freed and keeps the big per-scale
    activations in its heap, where fragmentation holds on to them between images. No-op elsewhere.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim) after large objects are gone."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def proc_mb(field: str, path: str = "/proc/self/status") -> float:
    """A kB field of a /proc file (``VmRSS`` of /proc/self/status, ``Pss`` of /proc/PID/smaps_rollup), MiB;
    OSError when the file or the field is not there."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in {path}")


def rss_mb() -> float:
    """Resident set size now, MiB (Linux)."""
    return proc_mb("VmRSS")


def rss_split_mb() -> tuple[float, float]:
    """(anonymous, file-backed) resident memory now, MiB: allocations vs mapped files such as library code."""
    return proc_mb("RssAnon"), proc_mb("RssFile")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux)."""
    return proc_mb("VmHWM")


def graph_bytes(folder: str | Path, m: Manifest | None = None, cpu: bool = True) -> dict[str, int]:
    """Role -> bytes on disk of each graph a runtime loads (on the CPU, with ``cpu``): weights plus the graph."""
    folder = Path(folder)
    m = m or Manifest.load(folder)
    return {role: sum(p.stat().st_size for p in folder.glob(name + "*"))
            for role, name in m.runtime_graphs(cpu).items()}


def weight_bytes(folder: str | Path, cpu: bool = True) -> int:
    """Bytes on disk of the graphs a runtime loads (on the CPU, with ``cpu``): weights plus graph descriptions."""
    return sum(graph_bytes(folder, cpu=cpu).values())
