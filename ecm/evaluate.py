"""``ecm-eval``: control fidelity of ECM against the same backbone without control.

The field's metric for Canny: F1 between the condition's edges and the Canny edges of the
generated image, per pixel. Reported for ECM, for the backbone alone (same classes and seeds),
and as ceilings for the ground-truth images and their VQVAE reconstructions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ecm.adapters import ECM
from ecm.controls import canny_edges
from ecm.data import to_model_range
from ecm.runtime.images import grid, save_png, to_rgb_map
from ecm.runtime.images import zoom as zoom_image
from ecm.var import VAR


def edge_f1(pred_HW: np.ndarray, target_HW: np.ndarray) -> float:
    """Per-pixel F1 of two binary edge maps (non-zero = edge); 1.0 when both are empty."""
    p, t = pred_HW > 0, target_HW > 0
    tp = np.logical_and(p, t).sum()
    if p.sum() + t.sum() == 0:
        return 1.0
    return float(2 * tp / (p.sum() + t.sum()))


def to_uint8(images_B3HW: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] -> uint8 (B, H, W, 3)."""
    return (images_B3HW.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class EvalResult:
    """Mean Canny F1 against the conditions, per kind of image."""

    f1_ecm: float
    f1_backbone: float
    f1_ground_truth: float
    f1_reconstruction: float
    num_images: int

    @property
    def ratio(self) -> float:
        return self.f1_ecm / max(self.f1_backbone, 1e-9)

    def table(self) -> str:
        rows = [("ECM (backbone + adapters)", self.f1_ecm), ("backbone without control", self.f1_backbone),
                ("ground-truth images (ceiling)", self.f1_ground_truth),
                ("VQVAE reconstructions (ceiling)", self.f1_reconstruction)]
        lines = [f"Canny F1 on {self.num_images} held-out images", f"{'':34}{'F1':>8}"]
        lines += [f"{name:34}{value:8.4f}" for name, value in rows]
        lines.append(f"{'ECM / backbone':34}{self.ratio:7.2f}x")
        return "\n".join(lines)


@torch.no_grad()
def evaluate(var: VAR, ecm: ECM, images_NHW3: np.ndarray, labels_N: np.ndarray, *, cfg: float, top_k: int,
             top_p: float, temperature: str, seed: int = 0, batch: int = 16,
             grid_path: Path | None = None, progress=None) -> EvalResult:
    """Generate with and without the adapters for each held-out image's edges; score both."""
    vae = var.vae
    conds = np.stack([canny_edges(im) for im in images_NHW3])
    f1 = {"ecm": [], "backbone": [], "gt": [], "rec": []}
    shown = []
    starts = range(0, len(labels_N), batch)
    for b in progress(starts) if progress else starts:
        img_u8, cond, label = images_NHW3[b:b + batch], conds[b:b + batch], labels_N[b:b + batch]
        ctrl = to_model_range(to_rgb_map(cond))
        kw = dict(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed + b)
        with_ecm = to_uint8(var.generate(label, ecm=ecm, control_B3HW=ctrl, **kw).images)
        without = to_uint8(var.generate(label, **kw).images)
        rec = to_uint8(vae.img_to_reconstructed_img(to_model_range(img_u8)) * 0.5 + 0.5)
        for i, c in enumerate(cond):
            f1["ecm"].append(edge_f1(canny_edges(with_ecm[i]), c))
            f1["backbone"].append(edge_f1(canny_edges(without[i]), c))
            f1["gt"].append(edge_f1(canny_edges(img_u8[i]), c))
            f1["rec"].append(edge_f1(canny_edges(rec[i]), c))
        if len(shown) < 8:
            shown += [(c, with_ecm[i], without[i]) for i, c in enumerate(cond)][: 8 - len(shown)]
    if grid_path is not None:
        save_grid(shown, grid_path)
    mean = {k: float(np.mean(v)) for k, v in f1.items()}
    return EvalResult(mean["ecm"], mean["backbone"], mean["gt"], mean["rec"], len(labels_N))


def evaluate_engine(folder: Path, images_NHW3: np.ndarray, labels_N: np.ndarray, *, cfg: float, top_k: int,
                    top_p: float, temperature: str, seed: int = 0, batch: int = 16, progress=None) -> float:
    """Mean Canny F1 of an export run by ONNX Runtime, with the seeds :func:`evaluate` uses."""
    from ecm.runtime.loop import Sampling, ScaleLoop
    from ecm.runtime.manifest import Manifest
    from ecm.runtime.ort_backend import OrtBackend

    m = Manifest.load(folder)
    backend = OrtBackend(folder, m)
    sampling = Sampling.defaults(m, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature)
    conds = np.stack([canny_edges(im) for im in images_NHW3])
    scores, loops = [], {}  # a loop's buffers serve every batch of its size
    starts = range(0, len(labels_N), batch)
    for b in progress(starts) if progress else starts:
        cond, label = conds[b:b + batch], labels_N[b:b + batch]
        if len(label) not in loops:
            loops[len(label)] = ScaleLoop(m, backend, len(label))
        out = loops[len(label)].run(label, to_rgb_map(cond), sampling, seed=seed + b).images
        scores += [edge_f1(canny_edges(img), c) for img, c in zip(out, cond)]
    return float(np.mean(scores))


def overlay(cond_HW: np.ndarray, img_HW3: np.ndarray) -> np.ndarray:
    """Generated image dimmed, condition edges in green, generated edges in red (yellow = both)."""
    out = (img_HW3.astype(np.float32) * 0.35).astype(np.uint8)
    gen = canny_edges(img_HW3) > 0
    out[cond_HW > 0] = (0, 255, 0)
    out[gen] = (255, 0, 0)
    out[np.logical_and(gen, cond_HW > 0)] = (255, 255, 0)
    return out


def save_grid(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path, zoom: int = 3) -> None:
    """One row per example: condition | ECM | ECM edge overlay | backbone without control."""
    tiles = [[to_rgb_map(c), g, overlay(c, g), b] for c, g, b in rows]
    save_png(zoom_image(grid(tiles, pad=0), zoom), path)
