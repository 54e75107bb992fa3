"""``ecm-eval``: control fidelity of ECM against the same backbone without control.

Each control type defines its fidelity (:class:`ecm.runtime.controls.ControlType`): for Canny, the
field's metric, the per-pixel F1 between the condition's edges and the Canny edges of the
generated image; for other binary controls the same F1 of their maps; for the rest the RMSE
between the condition map and the map extracted again from the generated image. Reported for
ECM, for the backbone alone (same classes and seeds), and as ceilings for the ground-truth
images and their VQVAE reconstructions. Maps made by other tools (``folder:<name>``) are scored by
the extractor a user registers under ``<name>``; without one no metric exists for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecm.eval.held_out import HeldOut
from ecm.model.adapters import ECM
from ecm.model.pixels import to_model_range
from ecm.model.var import VAR
from ecm.runtime.controls import ControlType, scoring_control
from ecm.runtime.images import grid, save_png
from ecm.runtime.images import zoom as zoom_image
from ecm.runtime.manifest import ControlSpec

Progress = Callable[[Iterable[Any]], Iterable[Any]]
#: Held-out samples generated at once.
EVAL_BATCH = 16


def to_uint8(images_B3HW: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] -> uint8 (B, H, W, 3)."""
    return (images_B3HW.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class EvalResult:
    """Mean fidelity to the conditions, per kind of image, in the control's own metric."""

    control: str
    metric: str
    higher_is_better: bool
    ecm: float
    backbone: float
    ground_truth: float | None  # None: the images are not at hand (a cache whose source folder is gone)
    reconstruction: float
    num_images: int

    @property
    def ratio(self) -> float:
        """How many times better ECM is than the backbone alone (> 1: better, whichever way the metric runs)."""
        a, b = (self.ecm, self.backbone) if self.higher_is_better else (self.backbone, self.ecm)
        return a / max(b, 1e-9)

    def table(self) -> str:
        rows = [("ECM (backbone + adapters)", self.ecm), ("backbone without control", self.backbone),
                ("ground-truth images (ceiling)", self.ground_truth),
                ("VQVAE reconstructions (ceiling)", self.reconstruction)]
        name = f"{self.control} {self.metric}"
        lines = [f"{name} on {self.num_images} held-out images ({'higher' if self.higher_is_better else 'lower'} "
                 "is better)", f"{'':34}{self.metric:>9}"]
        lines += [f"{label:34}{'n/a' if value is None else f'{value:.4f}':>9}" for label, value in rows]
        lines.append(f"{'ECM vs backbone':34}{self.ratio:8.2f}x")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ratio": self.ratio}


@torch.no_grad()
def evaluate(var: VAR, ecm: ECM, held_out: HeldOut, kind: ControlType, spec: ControlSpec, *, cfg: float,
             top_k: int, top_p: float, temperature: str, seed: int = 0, batch: int = EVAL_BATCH,
             grid_path: Path | None = None, progress: Progress | None = None) -> EvalResult:
    """Generate with and without the adapters for each held-out condition, a batch at a time; score both
    with ``kind`` (the control's metric), and the ceilings: ground truth where the images are at hand, and
    the VQVAE reconstructions (of the images, or decoded from a cache's tokens)."""
    vae = var.vae
    scores: dict[str, list[float]] = {"ecm": [], "backbone": [], "gt": [], "rec": []}
    shown = []
    batches = held_out.batches(batch)
    for b in progress(batches) if progress else batches:
        cond, label = b.conds_BHW3, np.minimum(b.labels_B, var.num_classes)
        kw = dict(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed + b.start)
        with_ecm = to_uint8(var.generate(label, ecm=ecm, control_B3HW=to_model_range(cond), **kw).images)
        without = to_uint8(var.generate(label, **kw).images)
        if b.tokens_BL is not None:
            rec = vae.idxBl_to_img(vae.quantize.split(torch.from_numpy(b.tokens_BL).long()))
        else:
            rec = vae.img_to_reconstructed_img(to_model_range(b.images_BHW3))
        kinds = [("ecm", with_ecm), ("backbone", without), ("rec", to_uint8(rec * 0.5 + 0.5))]
        if b.images_BHW3 is not None:
            kinds.append(("gt", b.images_BHW3))
        for key, imgs in kinds:
            scores[key] += [kind.score(img, c, spec) for img, c in zip(imgs, cond)]
        if len(shown) < 8:
            shown += list(zip(cond, with_ecm, without))[: 8 - len(shown)]
    if grid_path is not None:
        save_grid(shown, grid_path, kind, spec)
    mean = {k: float(np.mean(v)) if v else None for k, v in scores.items()}
    return EvalResult(spec.type, kind.metric, kind.higher_is_better, mean["ecm"], mean["backbone"], mean["gt"],
                      mean["rec"], len(held_out))


def evaluate_engine(folder: Path, held_out: HeldOut, *, cfg: float, top_k: int, top_p: float, temperature: str,
                    seed: int = 0, batch: int = EVAL_BATCH, progress: Progress | None = None) -> float:
    """Mean fidelity of an export run by ONNX Runtime, with the seeds :func:`evaluate` uses."""
    from ecm.runtime.loop import Sampling, ScaleLoop
    from ecm.runtime.manifest import Manifest
    from ecm.runtime.ort_backend import OrtBackend

    m = Manifest.load(folder)
    kind = scoring_control(m.control.type)
    sampling = Sampling.defaults(m, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature)
    scores, loops = [], {}  # a loop's buffers serve every batch of its size
    batches = held_out.batches(batch)
    with OrtBackend(folder, m) as backend:
        for b in progress(batches) if progress else batches:
            cond, label = b.conds_BHW3, np.minimum(b.labels_B, m.num_classes)
            if len(label) not in loops:
                loops[len(label)] = ScaleLoop(m, backend, len(label))
            out = loops[len(label)].run(label, cond, sampling, seed=seed + b.start).images
            scores += [kind.score(img, c, m.control) for img, c in zip(out, cond)]
    return float(np.mean(scores))


def overlay(cond_HW3: np.ndarray, img_HW3: np.ndarray, kind: ControlType, spec: ControlSpec) -> np.ndarray:
    """How the image follows a binary condition: the image dimmed, the condition's pixels in green, the
    image's own map in red (yellow = both); for other controls, the map extracted from the image."""
    got = kind.extract(img_HW3, spec)
    if not kind.binary:
        return got
    out = (img_HW3.astype(np.float32) * 0.35).astype(np.uint8)
    cond, gen = cond_HW3[..., 0] > 0, got[..., 0] > 0
    out[cond] = (0, 255, 0)
    out[gen] = (255, 0, 0)
    out[cond & gen] = (255, 255, 0)
    return out


def save_grid(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path, kind: ControlType,
              spec: ControlSpec, zoom: int = 3) -> None:
    """One row per example: condition | ECM | how ECM follows it (see :func:`overlay`) | backbone alone."""
    tiles = [[c, g, overlay(c, g, kind, spec), b] for c, g, b in rows]
    save_png(zoom_image(grid(tiles, pad=0), zoom), path)

