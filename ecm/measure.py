"""How the benchmarks measure: seconds per image in alternating rounds, peak memory in a fresh process.

Shared machines are noisy, so the backends under test take turns in rounds of about a second each
and each figure is its best round. Peak memory is the peak resident size of a fresh process per
backend, above what that process held once its framework was imported and set up. Importing this
module loads no torch, so a memory probe of the runtime runs without it::

    python -m ecm.measure onnxruntime EXPORT_FOLDER IMAGES
    python -m ecm.measure eager MODEL IMAGES      # MODEL: one of MODELS
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ecm.runtime.manifest import Manifest
from ecm.runtime.memory import peak_rss_mb, rss_mb, rss_split_mb, weight_bytes

if TYPE_CHECKING:
    from ecm.adapters import ECM
    from ecm.var import VAR

#: The models the benchmarks measure: the embedded default and the random d16-proportioned one.
MODELS = ("default", "d16")


def load_model(name: str) -> tuple[VAR, ECM]:
    """(var, ecm) of a benchmark model by name (see MODELS), in eval mode on the CPU."""
    if name == "default":
        from ecm.default_model import load_default

        _, var, ecm = load_default()
        return var, ecm
    if name == "d16":
        from ecm.random_models import d16_proportioned

        return d16_proportioned()
    raise ValueError(f"unknown benchmark model {name!r}; choose one of {', '.join(MODELS)}")


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


def probe_memory(kind: str, target: str, images: int) -> dict[str, Any]:
    """Peak memory of ``images`` generations in a fresh process: 'onnxruntime' on an export folder,
    or 'eager' PyTorch on a model of MODELS. MiB; see :func:`_probe_runtime` and :func:`_probe_eager`."""
    probe = subprocess.run([sys.executable, "-m", "ecm.measure", kind, str(target), str(images)],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise RuntimeError(f"memory probe ({kind} {target}) failed: {probe.stderr.strip()[-2000:]}")
    return json.loads(probe.stdout.strip().splitlines()[-1])


def _probe_runtime(folder: str, images: int) -> dict[str, Any]:
    """ONNX Runtime on the CPU: peak above a process that has set ONNX Runtime up, RSS after each image."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ecm.runtime.loop import Sampling, ScaleLoop
    from ecm.runtime.ort_backend import OrtBackend

    m = Manifest.load(folder)
    before = rss_mb()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    trivial = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    ort.InferenceSession(trivial.SerializeToString(), providers=["CPUExecutionProvider"])  # ORT's one-time set-up
    base, (anon0, file0) = rss_mb(), rss_split_mb()
    loop = ScaleLoop(m, OrtBackend(folder, m), 1)
    cond = condition(m) if m.control else None
    after = []
    for i in range(images):
        loop.run(np.array([i % m.num_classes]), cond, Sampling.defaults(m), seed=i)
        after.append(rss_mb() - base)
    anon, file = rss_split_mb()
    return {"peak": peak_rss_mb() - base, "after": after, "setup": base - before,
            "weights": weight_bytes(folder) / 2**20, "kv": m.kv_cache_bytes(1) / 2**20,
            "anon_after": anon - anon0, "file_after": file - file0}


def _probe_eager(name: str, images: int) -> dict[str, Any]:
    """Eager PyTorch: peak above a process that has imported and set torch up, model building included."""
    before = rss_mb()
    import torch

    from ecm.data import to_model_range

    torch.ones(64, 64) @ torch.ones(64, 64)  # torch's one-time set-up: thread pool, kernels
    base = rss_mb()
    var, ecm = load_model(name)
    ctrl = to_model_range(cross_condition(var.vae.config.resolution))
    after = []
    with torch.no_grad():
        for i in range(images):
            var.generate([i % var.num_classes], ecm=ecm, control_B3HW=ctrl, seed=i)
            after.append(rss_mb() - base)
    weights = sum(p.numel() * p.element_size() for p in (*var.parameters(), *ecm.parameters(), *var.vae.parameters()))
    return {"peak": peak_rss_mb() - base, "after": after, "setup": base - before, "weights": weights / 2**20}


if __name__ == "__main__":
    probe = {"onnxruntime": _probe_runtime, "eager": _probe_eager}[sys.argv[1]]
    print(json.dumps(probe(sys.argv[2], int(sys.argv[3]))))
