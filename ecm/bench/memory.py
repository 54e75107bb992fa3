"""Peak memory of a backend in a fresh process, above what that process held once set up.

Each probe runs in its own interpreter (``probe_memory``), so one backend's allocations never
count against another's. Importing this module loads no torch: the runtime's probe runs without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np

from ecm.bench.timing import condition, cross_condition
from ecm.runtime.manifest import Manifest
from ecm.runtime.memory import peak_rss_mb, rss_mb, rss_split_mb, weight_bytes

#: What a probe process runs: ``main`` with the probe's kind, target and image count as arguments.
_PROBE = "import sys; from ecm.bench.memory import main; main(sys.argv[1:])"


def probe_memory(kind: str, target: str, images: int) -> dict[str, Any]:
    """Peak memory of ``images`` generations in a fresh process: 'onnxruntime' on an export folder,
    or 'eager' PyTorch on a model of MODELS. MiB; see :func:`_probe_runtime` and :func:`_probe_eager`."""
    probe = subprocess.run([sys.executable, "-c", _PROBE, kind, str(target), str(images)],
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

    from ecm.bench.models import load_model
    from ecm.model.pixels import to_model_range

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


def main(argv: list[str]) -> None:
    """A probe process: ``onnxruntime EXPORT_FOLDER IMAGES`` or ``eager MODEL IMAGES``; prints the figures as JSON."""
    kind, target, images = argv
    print(json.dumps({"onnxruntime": _probe_runtime, "eager": _probe_eager}[kind](target, int(images))))
