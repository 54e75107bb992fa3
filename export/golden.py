"""Golden inputs and outputs for every graph, made with polygraphy's ONNX Runtime runner.

On the GPU the same files check a TensorRT build of the ONNX (``golden/README.md`` has the
commands), so a deployment can be compared with what was verified here without torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ecm.export.quiet import quiet
from ecm.export.verify import conditions
from ecm.runtime.files import atomic_path
from ecm.runtime.loop import Arrays, Sampling, ScaleLoop
from ecm.runtime.manifest import Manifest, control_role
from ecm.runtime.ort_backend import OrtBackend


def golden_scales(m: Manifest) -> list[int]:
    """Scales with golden data: the first (empty cache), the second, and the middle one."""
    return sorted({0, 1, m.num_scales // 2})


def save_golden(folder: Path, m: Manifest) -> list[Path]:
    """Run one real generation, then save polygraphy inputs/outputs for chosen feeds of every graph."""
    labels, cond = conditions(m, m.batch)
    sampling = Sampling.defaults(m)
    with OrtBackend(folder, m) as backend:
        loop = ScaleLoop(m, backend, m.batch)
        traj = loop.run(labels, cond, sampling, record=True)  # leaves the full KV cache in the loop's buffers
    cases: list[tuple[str, str, Arrays]] = []
    if cond is not None:  # any uint8 image serves a comparison: every control encoder and the image encoder get it
        cases += [(control_role(k), control_role(k), {"cond": cond}) for k in range(len(m.controls))]
        cases.append(("encoder", "encoder", {"image": cond}))
    for si in golden_scales(m):
        pn = m.patch_nums[si]
        u = traj.uniforms[si].reshape(m.batch, pn, pn)
        feeds = loop.step_feeds(si, labels, traj.x_in[si], traj.f_hat_in[si], u, sampling)
        cases.append((f"step_s{si}", "step", feeds))
    cases.append(("decoder", "decoder", {"f_hat": traj.f_hat}))
    gold = folder / "golden"
    written = [_run(folder / m.graphs[role], name, feeds, gold) for name, role, feeds in cases]
    readme = gold / "README.md"
    with atomic_path(readme) as tmp:
        tmp.write_text(_readme(m, [name for name, _, _ in cases], {name: feeds for name, _, feeds in cases}))
    return [*[p for pair in written for p in pair], readme]


def _run(onnx_path: Path, name: str, feeds: Arrays, gold: Path) -> tuple[Path, Path]:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.json import save_json

    feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
    inputs, outputs = gold / f"{name}.inputs.json", gold / f"{name}.outputs.json"
    with quiet():  # polygraphy reports every run and save
        results = Comparator.run([OnnxrtRunner(SessionFromOnnx(str(onnx_path)))], data_loader=[feeds])
        with atomic_path(inputs) as tmp:
            save_json([feeds], str(tmp))
        with atomic_path(outputs) as tmp:
            results.save(str(tmp))
    return inputs, outputs


def _readme(m: Manifest, names: list[str], feeds: dict[str, Arrays]) -> str:
    lines = ["# Golden data of this export", "",
             "Inputs and ONNX Runtime outputs (polygraphy JSON) of one real generation, batch "
             f"{m.batch}. To check a TensorRT build of the same ONNX on the target GPU:", ""]
    for name in names:
        role = "step" if name.startswith("step") else name
        shapes = " ".join(f"{k}:[{','.join(map(str, v.shape))}]" for k, v in feeds[name].items())
        lines += ["```", f"polygraphy run {m.graphs[role]} --trt --onnxrt \\",
                  f"    --load-inputs golden/{name}.inputs.json --load-outputs golden/{name}.outputs.json \\",
                  f"    --trt-min-shapes {shapes} \\", f"    --trt-opt-shapes {shapes} \\",
                  f"    --trt-max-shapes {shapes} --atol 1e-3 --rtol 1e-3", "```", ""]
    lines += ["Sampled tokens can differ where two candidates' probabilities are within the backends' "
              "rounding of each other; logits are the meaningful comparison."]
    return "\n".join(lines) + "\n"
