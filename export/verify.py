"""Every export is checked: the ONNX graphs under ONNX Runtime against the eager model.

Two comparisons, same labels, conditions and uniforms:

* free-running generation: per-scale logits, sampled tokens, final image;
* teacher forcing: the graphs get the eager run's inputs at every scale, so reduced precision is
  measured scale by scale without earlier samples diverging (top-1 agreement of guided logits).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from ecm.runtime.images import to_rgb_map
from ecm.runtime.loop import Sampling, ScaleLoop, Trajectory
from ecm.runtime.manifest import Manifest
from ecm.runtime.ort_backend import OrtBackend
from ecm.runtime.sampling import cfg_weight

from ecm.adapters import ECM
from ecm.data import ProceduralShapes, to_model_range
from ecm.default_model import HELD_OUT_SEED
from ecm.evaluate import to_uint8
from ecm.sampling import mix_cfg
from ecm.var import VAR, Generation


@dataclass
class ScaleReport:
    patch: int
    logits_max_abs_diff: float
    logits_rel_diff: float  # max abs diff / max |eager logit|
    token_agreement: float  # free-running, same uniforms
    teacher_top1_agreement: float  # teacher-forced argmax of the guided logits


@dataclass
class VerifyReport:
    precision: str
    batch: int
    seed: int
    scales: list[ScaleReport]
    image_max_abs_diff: int  # uint8 levels, free-running

    @property
    def worst_rel_diff(self) -> float:
        return max(s.logits_rel_diff for s in self.scales)

    @property
    def min_token_agreement(self) -> float:
        return min(s.token_agreement for s in self.scales)

    @property
    def min_teacher_agreement(self) -> float:
        return min(s.teacher_top1_agreement for s in self.scales)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(worst_logits_rel_diff=self.worst_rel_diff, min_token_agreement=self.min_token_agreement,
                 min_teacher_top1_agreement=self.min_teacher_agreement)
        return d

    def summary(self) -> str:
        return (f"ONNX Runtime vs eager ({self.precision}, batch {self.batch}): logits rel diff <= "
                f"{self.worst_rel_diff:.2e}, tokens {100 * self.min_token_agreement:.2f}% (worst scale), "
                f"teacher-forced top-1 {100 * self.min_teacher_agreement:.2f}% (worst scale), "
                f"image max diff {self.image_max_abs_diff}")


def conditions(m: Manifest, batch: int, seed: int = HELD_OUT_SEED) -> tuple[np.ndarray, np.ndarray | None]:
    """Held-out labels and uint8 condition maps from the procedural set (seed 1000, not trained on)."""
    data = ProceduralShapes(size=batch, resolution=m.control.resolution if m.control else m.image_size, seed=seed)
    images, labels = zip(*(data[i] for i in range(batch)))
    labels = np.asarray(labels, np.int64) % m.num_classes
    if m.control is None:
        return labels, None
    from ecm.controls import canny_edges

    edges = [canny_edges(img, m.control.canny_low, m.control.canny_high) for img in images]
    return labels, to_rgb_map(np.stack(edges))


def guided_argmax(logits_2BlV: np.ndarray, t: float) -> np.ndarray:
    """Top-1 token of the CFG-mixed logits."""
    return mix_cfg(torch.from_numpy(logits_2BlV), t).argmax(-1).numpy()


@dataclass
class Reference:
    """An eager (fp32) generation on held-out conditions: what every export is compared with."""

    labels: np.ndarray
    cond: np.ndarray | None
    sampling: Sampling
    seed: int
    generation: Generation

    @property
    def images(self) -> np.ndarray:
        return to_uint8(self.generation.images)


@torch.no_grad()
def eager_reference(var: VAR, ecm: ECM | None, m: Manifest, batch: int, seed: int = 0) -> Reference:
    """Generate ``batch`` held-out images eagerly with the export's sampling settings, keeping every scale."""
    sampling = Sampling.defaults(m)
    labels, cond = conditions(m, batch)
    ctrl = to_model_range(cond) if cond is not None else None
    gen = var.generate(torch.from_numpy(labels), cfg=sampling.cfg, top_k=sampling.top_k, top_p=sampling.top_p,
                       temperature=sampling.temperature, seed=seed, ecm=ecm, control_B3HW=ctrl,
                       candidates=m.candidates, trace=True)
    return Reference(labels, cond, sampling, seed, gen)


def compare(folder: Path, ref: Reference, cpu_forms: bool = True) -> tuple[VerifyReport, np.ndarray]:
    """Run the export in ``folder`` free and teacher-forced on ``ref``'s inputs; the report and its images.

    ``cpu_forms=False`` runs an INT8 export's Q/DQ graphs (TensorRT's) instead of its CPU forms.
    """
    m = Manifest.load(folder)
    B, eager = len(ref.labels), ref.generation
    loop = ScaleLoop(m, OrtBackend(folder, m, cpu_forms=cpu_forms), B)
    free = loop.run(ref.labels, ref.cond, ref.sampling, seed=ref.seed, record=True)
    teacher = Trajectory(x_in=[x.numpy() for x in eager.x_in], f_hat_in=[f.numpy() for f in eager.f_hat_in])
    forced = loop.run(ref.labels, ref.cond, ref.sampling, seed=ref.seed, teacher=teacher, record=True, decode=False)

    scales = []
    for si, pn in enumerate(m.patch_nums):
        want = eager.logits[si].numpy()
        diff = float(np.abs(free.logits[si] - want).max())
        t = cfg_weight(ref.sampling.cfg, si, m.num_scales)
        scales.append(ScaleReport(
            patch=pn, logits_max_abs_diff=diff, logits_rel_diff=diff / float(np.abs(want).max()),
            token_agreement=float((free.tokens[si] == eager.idx_list[si].numpy()).mean()),
            teacher_top1_agreement=float((guided_argmax(forced.logits[si], t) == guided_argmax(want, t)).mean())))
    image_diff = int(np.abs(free.images.astype(int) - ref.images.astype(int)).max())
    return VerifyReport(m.precision, B, ref.seed, scales, image_diff), free.images


def verify_export(folder: Path, var: VAR, ecm: ECM | None, seed: int = 0, batch: int | None = None) -> VerifyReport:
    """Run the export in ``folder`` with ONNX Runtime and compare it with the eager (fp32) model."""
    m = Manifest.load(folder)
    return compare(folder, eager_reference(var, ecm, m, batch or m.batch, seed))[0]
