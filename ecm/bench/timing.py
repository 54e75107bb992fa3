"""How the benchmarks time: seconds per image in alternating rounds, on fixed inputs.

Shared machines are noisy, so the backends under test take turns in rounds of about a second each
and each figure is its best round. Torch-free, like the runtime it times.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ecm.runtime.manifest import Manifest


def per_image(fn: Callable[[], object], images: int) -> float:
    """Mean seconds per call over ``images`` consecutive calls."""
    start = time.perf_counter()
    for _ in range(images):
        fn()
    return (time.perf_counter() - start) / images


def images_per_round(fn: Callable[[], object], seconds: float = 1.0) -> int:
    """How many calls of ``fn`` (warmed up) take about ``seconds``, from one timed call."""
    return max(1, round(seconds / per_image(fn, 1)))


def alternate(fns: dict[str, Callable[[], object]], repeats: int, images: int | dict[str, int],
              progress: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Seconds per image of each function in each of ``repeats`` rounds; every round runs them all in turn.

    ``images``: calls per round, for all functions or per function name.
    """
    counts = images if isinstance(images, dict) else dict.fromkeys(fns, images)
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            rounds[name].append(per_image(fn, counts[name]))
        if progress is not None:
            progress(r + 1)
    return rounds


def condition(m: Manifest) -> np.ndarray:
    """A fixed condition image for the export that ``m`` describes (see :func:`cross_condition`)."""
    return cross_condition(m.control.resolution)


def cross_condition(resolution: int) -> np.ndarray:
    """A fixed condition image (1, R, R, 3) uint8: a cross of white lines on black."""
    R = resolution
    cond = np.zeros((1, R, R, 3), np.uint8)
    cond[:, R // 4:3 * R // 4, R // 3] = 255
    cond[:, R // 2, R // 4:3 * R // 4] = 255
    return cond
