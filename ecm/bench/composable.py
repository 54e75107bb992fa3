"""Composable control, measured: each control alone and together, inpainting and outpainting.

On held-out procedural images (seed 1000, never trained on) with the same classes and seeds for
every variant, eagerly (the exported graphs give the same tokens: tests/test_composable.py):

* each control's fidelity (its own metric) with its adapters alone, with all adapter sets at once
  (each with its condition) and with the backbone alone;
* inpainting: PSNR of the kept region against the input, beside the VQVAE reconstruction's, and
  the Canny F1 of the generated region with and without the Canny adapters;
* outpainting: the kept box's PSNR the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from ecm.data.datasets import HELD_OUT_SEED, ProceduralShapes
from ecm.eval.fidelity import to_uint8
from ecm.model.adapters import ECM, ControlMix
from ecm.model.inpaint import Known
from ecm.model.pixels import to_model_range
from ecm.model.var import VAR
from ecm.runtime.controls import control_type, edge_f1, psnr
from ecm.runtime.inpaint import SIDES, outpaint_canvas

BATCH = 16


def held_out(n: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` held-out procedural images (uint8 (N, R, R, 3)) and their labels."""
    data = ProceduralShapes(size=n, resolution=resolution, seed=HELD_OUT_SEED)
    images, labels = zip(*(data[i] for i in range(n)))
    return np.stack(images), np.asarray(labels, np.int64)


@torch.no_grad()
def generate(var: VAR, labels: np.ndarray, mix: ControlMix | None = None,
             conds: Sequence[np.ndarray | None] = (), known: tuple[np.ndarray, np.ndarray] | None = None,
             seed: int = 0, paste: bool = True) -> np.ndarray:
    """uint8 images, BATCH at a time; image j uses seed ``seed + j`` whatever the batching. ``known``: the canvas
    and the mask to generate (1) of every image; ``paste=False`` decodes the final latent alone (no reconstruction
    pasted into the kept pixels)."""
    out = []
    for a in range(0, len(labels), BATCH):
        b = min(a + BATCH, len(labels))
        ctrls = [None if c is None else to_model_range(c[a:b]) for c in conds]
        keep = None if known is None else Known.encode(var.vae, to_model_range(known[0][a:b]), known[1][a:b])
        gen = var.generate(torch.from_numpy(labels[a:b]), seed=seed + a, ecm=mix, control_B3HW=ctrls or None,
                           known=keep)
        out.append(to_uint8(gen.images if paste else var.vae.fhat_to_img(gen.f_hat) * 0.5 + 0.5))
    return np.concatenate(out)


def fidelity(name: str, images: np.ndarray, conds: np.ndarray) -> float:
    """Mean fidelity of images to their conditions in control ``name``'s metric."""
    kind = control_type(name)
    return float(np.mean([kind.score(im, c) for im, c in zip(images, conds)]))


def region_psnr(a: np.ndarray, b: np.ndarray, region_NHW: np.ndarray) -> float:
    """Mean over images of the PSNR of a and b on the pixels where ``region`` is True."""
    return float(np.mean([psnr(x[r], y[r]) for x, y, r in zip(a, b, region_NHW)]))


def region_f1(images: np.ndarray, conds: np.ndarray, region_NHW: np.ndarray) -> float:
    """Mean Canny F1 of generated images against Canny conditions, on the region only."""
    canny = control_type("canny")
    return float(np.mean([edge_f1(canny.extract(im)[..., 0][r], c[..., 0][r])
                          for im, c, r in zip(images, conds, region_NHW)]))


@dataclass
class ComboFigures:
    """Each control's fidelity alone, together with the others, and without control."""

    control: str
    metric: str
    alone: float
    together: float
    backbone: float

    @property
    def kept(self) -> float:
        """Together as a share of alone (the acceptance asks >= 0.9)."""
        return self.together / self.alone

    @property
    def margin(self) -> float:
        """Alone against the backbone without control, as a ratio."""
        return self.alone / self.backbone


def combination(var: VAR, ecms: list[ECM], images: np.ndarray, labels: np.ndarray,
                weights: Sequence[float] | None = None) -> list[ComboFigures]:
    """Every adapter set alone and all of them at once, each control scored on its own condition."""
    names = [e.config.control for e in ecms]
    conds = [np.stack([control_type(n).extract(im) for im in images]) for n in names]
    backbone = generate(var, labels)
    together = generate(var, labels, ControlMix(ecms, weights), conds)
    out = []
    for k, name in enumerate(names):
        alone = generate(var, labels, ControlMix([ecms[k]]), [conds[k]])
        out.append(ComboFigures(name, control_type(name).metric, fidelity(name, alone, conds[k]),
                                fidelity(name, together, conds[k]), fidelity(name, backbone, conds[k])))
    return out


@dataclass
class EditFigures:
    """One inpainting or outpainting setting: the kept region against the VQVAE reconstruction, and the
    generated region's Canny F1 with and without the Canny adapters."""

    name: str
    kept_psnr: float  # the output's kept region against the input
    recon_psnr: float  # the VQVAE reconstruction's kept region against the input
    latent_only_psnr: float  # the kept region of the final latent decoded alone, before the reconstruction's paste
    generated_f1_ecm: float | None
    generated_f1_backbone: float | None

    @property
    def kept_gap_db(self) -> float:
        return self.recon_psnr - self.kept_psnr

    @property
    def latent_only_gap_db(self) -> float:
        return self.recon_psnr - self.latent_only_psnr


def reconstruct(var: VAR, images: np.ndarray) -> np.ndarray:
    """The VQVAE's reconstructions of uint8 images."""
    with torch.no_grad():
        rec = var.vae.img_to_reconstructed_img(to_model_range(images))
    return to_uint8(rec * 0.5 + 0.5)


def editing(var: VAR, canny: ECM | None, name: str, canvas: np.ndarray, generate_NHW: np.ndarray,
            labels: np.ndarray) -> EditFigures:
    """Inpaint ``canvas`` where ``generate`` is 1, without control and (with ``canny``) following the canvas's
    Canny edges; the kept region is where no pixel is to be generated."""
    kept = generate_NHW == 0
    plain = generate(var, labels, known=(canvas, generate_NHW))
    f1_ecm = f1_backbone = None
    if canny is not None:
        edges = np.stack([control_type("canny").extract(im) for im in canvas])
        steered = generate(var, labels, ControlMix([canny]), [edges], known=(canvas, generate_NHW))
        region = generate_NHW == 1
        f1_ecm, f1_backbone = region_f1(steered, edges, region), region_f1(plain, edges, region)
    unpasted = generate(var, labels, known=(canvas, generate_NHW), paste=False)
    return EditFigures(name, region_psnr(plain, canvas, kept), region_psnr(reconstruct(var, canvas), canvas, kept),
                       region_psnr(unpasted, canvas, kept), f1_ecm, f1_backbone)


def box_mask(n: int, R: int, top: int, left: int, height: int, width: int) -> np.ndarray:
    """Masks (N, R, R) that generate a height x width box."""
    mask = np.zeros((n, R, R), np.float32)
    mask[:, top:top + height, left:left + width] = 1
    return mask


def outpainting(var: VAR, images: np.ndarray, labels: np.ndarray, margins: dict[str, int]) -> EditFigures:
    """Outpaint every image by ``margins``, on the canvas ``ecm-run --outpaint`` builds."""
    canvases = [outpaint_canvas(Image.fromarray(im), margins, images.shape[1]) for im in images]
    label = ",".join(f"{s}={margins[s]}" for s in SIDES if margins.get(s))
    return editing(var, None, f"outpaint {label}", np.stack([c.image for c in canvases]),
                   np.stack([c.generate for c in canvases]), labels)


def figures_dict(items: list) -> list[dict]:
    return [{**asdict(x), **{k: getattr(x, k) for k in ("kept", "margin", "kept_gap_db", "latent_only_gap_db")
                             if hasattr(x, k)}}
            for x in items]
