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
from ecm.runtime.controls import control_type, to_rgb_map
from ecm.runtime.loop import Sampling, ScaleLoop, Trajectory
from ecm.runtime.manifest import Manifest
from ecm.runtime.ort_backend import OrtBackend
from ecm.runtime.sampling import cfg_weight
from ecm.runtime.schedule import parse_temperature

from ecm.data.datasets import HELD_OUT_SEED, ProceduralShapes
from ecm.model.adapters import ControlMix
from ecm.model.pixels import to_model_range, to_uint8
from ecm.model.sampler import flip_margins, guided_logits, mix_cfg
from ecm.model.var import VAR, Generation


@dataclass
class ScaleReport:
    patch: int
    logits_max_abs_diff: float
    logits_rel_diff: float  # max abs diff / max |eager logit|
    token_agreement: float  # free-running, same uniforms
    teacher_top1_agreement: float  # teacher-forced argmax of the guided logits


#: How far each precision's rounding may move a logit, relative to the largest logit of its row: a sampled
#: token that a change this small could flip is a near-tie (fp16 exports measured 1e-4..7e-4, W8A16 ~1e-2).
ROUNDING = {"fp32": 1e-5, "fp16": 2e-3, "int8": 5e-2}


@dataclass
class Divergence:
    """Where free-running tokens first differ, and whether they differ only on near-ties there.

    Up to that scale both runs had the same inputs, so a token that differs was a choice the two
    runs' logits made differently: a near-tie when the eager draw was within the precision's
    rounding of picking the export's token (see :func:`ecm.sampling.flip_margins`).
    """

    scale: int
    differ: int  # tokens that differ at that scale
    tokens: int  # tokens at that scale
    near_ties: int  # of those that differ, how many within rounding of a tie
    largest_margin: float  # the largest flip margin among them, in logits
    tolerance: float  # the largest rounding allowance of the rows concerned, in logits

    @property
    def only_near_ties(self) -> bool:
        return self.near_ties == self.differ


@dataclass
class VerifyReport:
    precision: str
    batch: int
    seed: int
    scales: list[ScaleReport]
    image_max_abs_diff: int  # uint8 levels, free-running
    divergence: Divergence | None = None  # None: the free-running tokens are the same at every scale

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
        """One line: the teacher-forced agreement (the verdict), then what the free-running tokens say."""
        head = (f"ONNX Runtime vs eager ({self.precision}, batch {self.batch}): teacher-forced top-1 "
                f"{100 * self.min_teacher_agreement:.2f}% (worst scale); ")
        d = self.divergence
        if d is None:
            return head + f"free-running tokens identical at every scale, logits rel diff <= {self.worst_rel_diff:.2e}"
        where = f"free-running tokens first differ at scale {d.scale} ({d.differ} of {d.tokens})"
        if d.only_near_ties:
            why = (f"all on near-ties (within {self.precision} rounding of a tie, flip margin <= "
                   f"{d.largest_margin:.2g}), so later samples and the image ({self.image_max_abs_diff} levels) "
                   "differ as two draws of one model: not an export fault")
        else:
            why = (f"{d.differ - d.near_ties} of them beyond {self.precision} rounding (flip margin up to "
                   f"{d.largest_margin:.2g} > {d.tolerance:.2g}); image max diff {self.image_max_abs_diff}")
        return head + where + ", " + why


def conditions(m: Manifest, batch: int, seed: int = HELD_OUT_SEED) -> tuple[np.ndarray, np.ndarray | None]:
    """Held-out labels and uint8 condition maps (B, R, R, 3) made with the export's control from the
    procedural set (seed 1000, not trained on). Maps that come from files (``folder:<name>``) cannot be
    made here: the images' grey versions stand in, which serves comparisons of one model on one input."""
    data = ProceduralShapes(size=batch, resolution=m.control.resolution if m.control else m.image_size, seed=seed)
    images, labels = zip(*(data[i] for i in range(batch)))
    labels = np.asarray(labels, np.int64) % m.num_classes
    if m.control is None:
        return labels, None
    kind = control_type(m.control.type)
    if kind.extractor is None:
        return labels, to_rgb_map(np.stack([img.max(axis=2) for img in images]))
    return labels, np.stack([kind.extract(img, m.control) for img in images])


def guided_argmax(logits_2BlV: np.ndarray, t: float) -> np.ndarray:
    """Top-1 token of the CFG-mixed logits."""
    return mix_cfg(torch.from_numpy(logits_2BlV), t).argmax(-1).numpy()


#: Images per eager or ONNX Runtime run when checking an export: a d16's KV cache is 0.18 GB per image with
#: CFG in fp32 (a d30's 0.31 GB), so references of any size are made and compared in runs of this many.
CHUNK = 2


@dataclass
class Reference:
    """Eager (fp32) generations on held-out conditions, kept scale by scale: what every export is compared with.

    ``chunks`` holds runs of up to CHUNK images; image j overall is image j % CHUNK of chunk j // CHUNK
    and drew its uniforms from seed ``seed + j``, as in one run of all of them.
    """

    labels: np.ndarray
    cond: np.ndarray | None
    sampling: Sampling
    seed: int
    chunks: list[Generation]

    @property
    def images(self) -> np.ndarray:
        return np.concatenate([to_uint8(g.images) for g in self.chunks])

    def spans(self) -> list[tuple[int, int, Generation]]:
        """(first image, end, generation) of every chunk."""
        starts = np.cumsum([0] + [len(g.idx_list[0]) for g in self.chunks])
        return [(int(a), int(b), g) for a, b, g in zip(starts, starts[1:], self.chunks)]


@torch.no_grad()
def eager_reference(var: VAR, mix: ControlMix | None, m: Manifest, batch: int, seed: int = 0) -> Reference:
    """Generate ``batch`` held-out images eagerly with the export's sampling settings, keeping every scale."""
    sampling = Sampling.defaults(m)
    labels, cond = conditions(m, batch)
    chunks = []
    for a in range(0, batch, CHUNK):
        ctrl = to_model_range(cond[a:a + CHUNK]) if cond is not None else None
        chunks.append(var.generate(torch.from_numpy(labels[a:a + CHUNK]), cfg=sampling.cfg, top_k=sampling.top_k,
                                   top_p=sampling.top_p, temperature=sampling.temperature, seed=seed + a, ecm=mix,
                                   control_B3HW=ctrl, candidates=m.candidates, trace=True))
    return Reference(labels, cond, sampling, seed, chunks)


def preview_table(ref: Reference) -> list[list[float]] | None:
    """The least-squares linear map from a latent's channels (+ 1) to the RGB of the decoded image averaged over
    each latent cell, fitted on the reference generations: the runtime's decoder-free preview
    (``runtime.loop.latent_preview``). None where the image size is not a multiple of the latent's."""
    f_hat = np.concatenate([g.f_hat.numpy() for g in ref.chunks])  # (N, C, h, w)
    images = ref.images.astype(np.float64)  # (N, R, R, 3)
    N, C, h, _ = f_hat.shape
    R = images.shape[1]
    if R % h:
        return None
    cells = images.reshape(N, h, R // h, h, R // h, 3).mean(axis=(2, 4)).reshape(-1, 3)
    X = np.concatenate([f_hat.transpose(0, 2, 3, 1).reshape(-1, C), np.ones((N * h * h, 1))], axis=1)
    table = np.linalg.lstsq(X, cells, rcond=None)[0]
    return [[float(x) for x in row] for row in table]


def compare(folder: Path, ref: Reference, cpu_forms: bool = True) -> tuple[VerifyReport, np.ndarray]:
    """Run the export in ``folder`` free and teacher-forced on ``ref``'s inputs; the report and its images.

    ``cpu_forms=False`` runs an INT8 export's Q/DQ graphs (TensorRT's) instead of its CPU forms.
    """
    m = Manifest.load(folder)
    K = m.num_scales
    diff, top = np.zeros(K), np.zeros(K)
    same, forced_same, count = np.zeros(K), np.zeros(K), np.zeros(K)
    images, divergences = [], []
    with OrtBackend(folder, m, cpu_forms=cpu_forms) as backend:
        loops: dict[int, ScaleLoop] = {}
        for a, b, eager in ref.spans():
            loop = loops.setdefault(b - a, ScaleLoop(m, backend, b - a))
            labels, cond = ref.labels[a:b], None if ref.cond is None else ref.cond[a:b]
            free = loop.run(labels, cond, ref.sampling, seed=ref.seed + a, record=True)
            teacher = Trajectory(x_in=[x.numpy() for x in eager.x_in], f_hat_in=[f.numpy() for f in eager.f_hat_in])
            forced = loop.run(labels, cond, ref.sampling, seed=ref.seed + a, teacher=teacher, record=True,
                              decode=False)
            images.append(free.images)
            first = None
            for si in range(K):
                want, t = eager.logits[si].numpy(), cfg_weight(ref.sampling.cfg, si, K)
                diff[si] = max(diff[si], float(np.abs(free.logits[si] - want).max()))
                top[si] = max(top[si], float(np.abs(want).max()))
                equal = free.tokens[si] == eager.idx_list[si].numpy()
                same[si] += equal.sum()
                forced_same[si] += (guided_argmax(forced.logits[si], t) == guided_argmax(want, t)).sum()
                count[si] += equal.size
                if first is None and not equal.all():
                    first = si
                    divergences.append(diverged(si, eager.logits[si], free, eager.idx_list[si], ref.sampling, m))
    scales = [ScaleReport(patch=pn, logits_max_abs_diff=float(diff[si]), logits_rel_diff=float(diff[si] / top[si]),
                          token_agreement=float(same[si] / count[si]),
                          teacher_top1_agreement=float(forced_same[si] / count[si]))
              for si, pn in enumerate(m.patch_nums)]
    out = np.concatenate(images)
    image_diff = int(np.abs(out.astype(int) - ref.images.astype(int)).max())
    return VerifyReport(m.precision, len(ref.labels), ref.seed, scales, image_diff, merge(divergences, count)), out


def merge(divergences: list[Divergence], count: np.ndarray) -> Divergence | None:
    """The divergence of a whole reference from those of its chunks: at the first scale any chunk differs."""
    if not divergences:
        return None
    si = min(d.scale for d in divergences)
    at = [d for d in divergences if d.scale == si]
    return Divergence(si, sum(d.differ for d in at), int(count[si]), sum(d.near_ties for d in at),
                      max(d.largest_margin for d in at), max(d.tolerance for d in at))


def diverged(si: int, logits_2BlV: torch.Tensor, free: Trajectory, eager_Bl: torch.Tensor, s: Sampling,
             m: Manifest) -> Divergence:
    """The :class:`Divergence` at scale ``si``, the first where the export's tokens differ from the eager ones."""
    t = cfg_weight(s.cfg, si, m.num_scales)
    temperature = parse_temperature(s.temperature).values(m.num_scales)[si]
    got_Bl = torch.from_numpy(free.tokens[si])
    margin_Bl = flip_margins(logits_2BlV, torch.from_numpy(free.uniforms[si]), eager_Bl, got_Bl, cfg_t=t,
                             temperature=temperature, top_k=s.top_k, top_p=s.top_p, candidates=m.candidates)
    row_max_Bl = guided_logits(logits_2BlV, t, temperature).abs().amax(-1).double()
    tol_Bl = ROUNDING[m.precision] * row_max_Bl
    differ = got_Bl != eager_Bl
    return Divergence(si, int(differ.sum()), differ.numel(), int((differ & (margin_Bl <= tol_Bl)).sum()),
                      min(float(margin_Bl[differ].max()), 1e3), float(tol_Bl[differ].max()))  # 1e3: out of reach


def verify_export(folder: Path, ref: Reference) -> VerifyReport:
    """Run the export in ``folder`` with ONNX Runtime and compare it with the eager (fp32) model's ``ref``."""
    return compare(folder, ref)[0]
