"""``ecm-eval``: control fidelity of ECM against the same backbone without control.

Each control type defines its fidelity (:class:`ecm.runtime.controls.ControlType`): for Canny, the
field's metric, the per-pixel F1 between the condition's edges and the Canny edges of the
generated image; for other binary controls the same F1 of their maps; for the rest the RMSE
between the condition map and the map extracted again from the generated image. Reported for
ECM, for the backbone alone (same classes and seeds), and as ceilings for the ground-truth
images and their VQVAE reconstructions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecm.data.controls import Control
from ecm.model.adapters import ECM
from ecm.model.pixels import to_model_range
from ecm.model.var import VAR
from ecm.runtime.controls import control_type
from ecm.runtime.images import grid, save_png
from ecm.runtime.images import zoom as zoom_image

Progress = Callable[[Iterable[Any]], Iterable[Any]]


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
    ground_truth: float
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
        lines += [f"{label:34}{value:9.4f}" for label, value in rows]
        lines.append(f"{'ECM vs backbone':34}{self.ratio:8.2f}x")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ratio": self.ratio}


@torch.no_grad()
def evaluate(var: VAR, ecm: ECM, images_NHW3: np.ndarray, labels_N: np.ndarray, control: Control, *, cfg: float,
             top_k: int, top_p: float, temperature: str, seed: int = 0, batch: int = 16,
             grid_path: Path | None = None, progress: Progress | None = None) -> EvalResult:
    """Generate with and without the adapters for each held-out image's condition; score both."""
    vae, kind, spec = var.vae, control.kind, control.manifest_spec
    conds = np.stack([control(im) for im in images_NHW3])
    scores: dict[str, list[float]] = {"ecm": [], "backbone": [], "gt": [], "rec": []}
    shown = []
    starts = range(0, len(labels_N), batch)
    for b in progress(starts) if progress else starts:
        img_u8, cond, label = images_NHW3[b:b + batch], conds[b:b + batch], labels_N[b:b + batch]
        kw = dict(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed + b)
        with_ecm = to_uint8(var.generate(label, ecm=ecm, control_B3HW=to_model_range(cond), **kw).images)
        without = to_uint8(var.generate(label, **kw).images)
        rec = to_uint8(vae.img_to_reconstructed_img(to_model_range(img_u8)) * 0.5 + 0.5)
        for key, imgs in (("ecm", with_ecm), ("backbone", without), ("gt", img_u8), ("rec", rec)):
            scores[key] += [kind.score(img, c, spec) for img, c in zip(imgs, cond)]
        if len(shown) < 8:
            shown += list(zip(cond, with_ecm, without))[: 8 - len(shown)]
    if grid_path is not None:
        save_grid(shown, grid_path, control)
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    return EvalResult(control.spec, kind.metric, kind.higher_is_better, mean["ecm"], mean["backbone"], mean["gt"],
                      mean["rec"], len(labels_N))


def evaluate_engine(folder: Path, images_NHW3: np.ndarray, labels_N: np.ndarray, *, cfg: float, top_k: int,
                    top_p: float, temperature: str, seed: int = 0, batch: int = 16,
                    progress: Progress | None = None) -> float:
    """Mean fidelity of an export run by ONNX Runtime, with the seeds :func:`evaluate` uses."""
    from ecm.runtime.loop import Sampling, ScaleLoop
    from ecm.runtime.manifest import Manifest
    from ecm.runtime.ort_backend import OrtBackend

    m = Manifest.load(folder)
    kind = control_type(m.control.type)
    sampling = Sampling.defaults(m, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature)
    conds = np.stack([kind.extract(im, m.control) for im in images_NHW3])
    scores, loops = [], {}  # a loop's buffers serve every batch of its size
    starts = range(0, len(labels_N), batch)
    with OrtBackend(folder, m) as backend:
        for b in progress(starts) if progress else starts:
            cond, label = conds[b:b + batch], labels_N[b:b + batch]
            if len(label) not in loops:
                loops[len(label)] = ScaleLoop(m, backend, len(label))
            out = loops[len(label)].run(label, cond, sampling, seed=seed + b).images
            scores += [kind.score(img, c, m.control) for img, c in zip(out, cond)]
    return float(np.mean(scores))


def overlay(cond_HW3: np.ndarray, img_HW3: np.ndarray, control: Control) -> np.ndarray:
    """How the image follows a binary condition: the image dimmed, the condition's pixels in green, the
    image's own map in red (yellow = both); for other controls, the map extracted from the image."""
    got = control(img_HW3)
    if not control.kind.binary:
        return got
    out = (img_HW3.astype(np.float32) * 0.35).astype(np.uint8)
    cond, gen = cond_HW3[..., 0] > 0, got[..., 0] > 0
    out[cond] = (0, 255, 0)
    out[gen] = (255, 0, 0)
    out[cond & gen] = (255, 255, 0)
    return out


def save_grid(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path, control: Control,
              zoom: int = 3) -> None:
    """One row per example: condition | ECM | how ECM follows it (see :func:`overlay`) | backbone alone."""
    tiles = [[c, g, overlay(c, g, control), b] for c, g, b in rows]
    save_png(zoom_image(grid(tiles, pad=0), zoom), path)

