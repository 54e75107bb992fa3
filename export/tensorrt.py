"""TensorRT plans from an export folder, through polygraphy; kept thin on purpose.

One strongly typed plan per graph (precision comes from the ONNX: fp16 casts, int8 Q/DQ), so the
same code builds on TensorRT 10.3 (JetPack 6) through 11.x, where the FP16/INT8 builder flags are
gone. The step plan holds one optimization profile per scale (min = opt = max = that scale's
shapes from the manifest) with the weights stored once. A timing cache beside the plans makes
rebuilds fast. Plans must be built on the GPU that runs them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from ecm.runtime.device import device_name
from ecm.runtime.errors import ECMError, first_line
from ecm.runtime.files import atomic_path
from ecm.runtime.manifest import CPU_FORM, Manifest, Tensor, plan_file

TIMING_CACHE = "timing.cache"


def missing_tensorrt() -> str | None:
    """Why plans cannot be built here (no TensorRT, polygraphy or GPU), or None if they can."""
    for module, what in (("tensorrt", "TensorRT"), ("polygraphy", "polygraphy"), ("cuda", "cuda-python")):
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed"
    try:
        device_name()
    except ECMError:
        return "no CUDA GPU is visible"
    return None


def build_command(folder: Path) -> str:
    """The command that builds the plans of ``folder`` on the target."""
    return f"ecm-export --build-only {folder}"


def profile_shapes(m: Manifest, role: str) -> list[dict[str, Tensor]]:
    """Input shapes of each optimization profile of graph ``role`` (one per scale for the step)."""
    scales = range(m.num_scales) if role == "step" else [0]
    return [m.io(role, si).inputs for si in scales]


def build_plans(folder: str | Path, progress: Callable[[str], None] = print) -> Manifest:
    """Build a plan for every graph of the export in ``folder``; record them in its manifest."""
    m = Manifest.load(folder)
    reason = missing_tensorrt()
    if reason is not None:
        raise ECMError(f"cannot build TensorRT plans here: {reason}; run `{build_command(Path(folder))}` "
                       "on the target GPU with `pip install 'ecm[gpu]'`")
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath, Profile, engine_from_network, save_engine

    folder = Path(folder)
    cache = folder / TIMING_CACHE
    plans = {}
    for role, onnx_name in m.graphs.items():
        if role.endswith(CPU_FORM):  # INT8 graphs for ONNX Runtime's CPU kernels; TensorRT takes the Q/DQ ones
            continue
        profiles = []
        for shapes in profile_shapes(m, role):
            p = Profile()
            for name, t in shapes.items():
                p.add(name, min=t.shape, opt=t.shape, max=t.shape)
            profiles.append(p)
        progress(f"building {plan_file(onnx_name)} ({len(profiles)} profile(s)) ...")
        network = NetworkFromOnnxPath(str(folder / onnx_name), strongly_typed=True)
        config = CreateConfig(profiles=profiles, load_timing_cache=str(cache) if cache.exists() else None)
        try:
            engine = engine_from_network(network, config, save_timing_cache=str(cache))
        except Exception as e:  # TensorRT and polygraphy raise assorted types; the first line says what failed
            raise ECMError(f"TensorRT could not build {onnx_name}: {first_line(e, 300)}") from None
        with atomic_path(folder / plan_file(onnx_name)) as tmp:
            save_engine(engine, str(tmp))
        plans[role] = plan_file(onnx_name)
    gpu, capability = device_name()
    m.tensorrt = {"version": trt.__version__, "compute_capability": capability, "device": gpu, "plans": plans,
                  "built": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    m.save(folder)
    return m
