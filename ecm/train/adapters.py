"""``ecm-train``: ECM adapters on a frozen backbone, with early-centric sampling.

Early-centric sampling: with probability ``strength`` a batch is cut after a random number of
scales (uniform over 2 .. K-1), so it trains on a prefix of the token pyramid; otherwise on all of
it. Block-causal attention makes every prefix a valid sequence, and because late scales hold
most tokens, a cut batch costs a fraction of a full one. ``strength = 0`` is plain full-sequence
training. Control dropout replaces the control of a sample by none, so CFG can drop it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ecm.data.controls import Control
from ecm.data.datasets import Dataset
from ecm.model.adapters import ECM, load_ecm, save_ecm
from ecm.model.checkpoint import tensor_hash
from ecm.model.pixels import to_model_range
from ecm.model.var import VAR
from ecm.model.vqvae import VQVAE
from ecm.runtime.errors import CheckpointError
from ecm.runtime.scales import prefix_ends
from ecm.train.loop import Dist, TrainSpec, batch_indices, cross_entropy, fit
from ecm.train.pretrain import tokenize


def sample_num_scales(rng: np.random.Generator, num_scales: int, strength: float) -> int:
    """How many scales this batch trains on (early-centric when strength > 0)."""
    if strength > 0 and num_scales > 2 and rng.random() < strength:
        return int(rng.integers(2, num_scales))
    return num_scales


class ControlData:
    """Labels, control maps and the frozen VQVAE's tokens of a dataset whose maps are extracted (the
    procedural set), as arrays; image folders are prepared into caches and streamed instead.

    Made once, before training, with its own progress bar: each image is read, its control map
    made and its tokens computed (the VQVAE is frozen and the images fixed, so no step re-encodes).
    The images themselves are not kept.
    """

    def __init__(self, dataset: Dataset, control: Control, vae: VQVAE, batch: int = 64, show: bool = True):
        n = len(dataset)
        self.labels = np.empty(n, np.int64)
        self.controls = np.empty((n, control.resolution, control.resolution, 3), np.uint8)
        chunks = []
        with tqdm(total=n, desc="preparing data (images, control maps, tokens)", unit="img", disable=not show,
                  dynamic_ncols=True) as bar:
            for b in range(0, n, batch):
                images = np.stack([self._take(dataset, i) for i in range(b, min(n, b + batch))])
                self.controls[b:b + len(images)] = [control(img) for img in images]
                chunks.append(tokenize(vae, images, batch, show=False))
                bar.update(len(images))
        self.tokens_NL = torch.cat(chunks)

    def _take(self, dataset: Dataset, i: int) -> np.ndarray:
        img, self.labels[i] = dataset[i]
        return img

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: np.ndarray, device: torch.device):
        """Labels, control images in [-1, 1] and tokens (B, L) of the samples ``idx``."""
        label = torch.from_numpy(self.labels[idx]).to(device)
        return label, to_model_range(self.controls[idx]).to(device), self.tokens_NL[idx].long().to(device)


@dataclass
class Batch:
    """One step's samples on this process: labels, control images in [-1, 1], the tokens of the scales it
    trains on (early-centric: a prefix), and where its samples sit in the step's global batch."""

    label_B: torch.Tensor
    ctrl_B3HW: torch.Tensor
    tokens_BL: torch.Tensor
    num_scales: int
    positions_B: np.ndarray  # indices into the global batch of every process together


class Batches(Protocol):
    """Where a training step takes its batch from: ``(step, rng) -> Batch``."""

    def __call__(self, step: int, rng: np.random.Generator) -> Batch: ...


class InMemoryBatches:
    """Batches drawn with replacement from a :class:`ControlData` held in memory (the procedural demo)."""

    def __init__(self, data: ControlData, batch: int, dist: Dist, early_centric: float, patch_nums: tuple[int, ...]):
        self.data, self.batch, self.dist = data, batch, dist
        self.early_centric, self.ends = early_centric, prefix_ends(patch_nums)

    def __call__(self, step: int, rng: np.random.Generator) -> Batch:
        label, ctrl, tokens_BL = self.data.batch(batch_indices(rng, len(self.data), self.batch, self.dist),
                                                 self.dist.device)
        K = sample_num_scales(rng, len(self.ends), self.early_centric)
        r, B = self.dist.rank, self.batch
        return Batch(label, ctrl, tokens_BL[:, :self.ends[K - 1]], K, np.arange(r * B, (r + 1) * B))


class ECMTask(nn.Module):
    """Teacher-forced loss of backbone + ECM; only the ECM has trainable parameters.

    The control and class dropout coin flips are drawn for the step's global batch and each process
    takes those of its own samples, so a run on several processes is the same run as on one.
    """

    def __init__(self, ecm: ECM, var: VAR, batches: Batches, dist: Dist, control_drop: float):
        super().__init__()
        self.ecm, self.batches, self.dist, self.control_drop = ecm, batches, dist, control_drop
        self.backbone = (var,)  # frozen: kept out of the trained module's parameters

    def forward(self, step: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        var = self.backbone[0]
        b = self.batches(step, rng)
        K, ed = b.num_scales, b.tokens_BL.shape[1]
        quant = var.vae.quantize
        with torch.no_grad():
            x_BLCv = quant.idxBl_to_var_input(quant.split(b.tokens_BL), num_scales=K)
        flips = rng.random((2, len(b.positions_B) * self.dist.world))[:, b.positions_B]
        device = b.label_B.device
        keep_B = torch.from_numpy(flips[0] >= self.control_drop).to(device)
        drop_B = torch.from_numpy(flips[1] < var.cond_drop_rate).to(device)
        ctrl_BLD = self.ecm.control_tokens(b.ctrl_B3HW, keep_B, num_scales=K)
        logits = var(b.label_B, x_BLCv, self.ecm, ctrl_BLD, num_scales=K, drop_B=drop_B)
        return cross_entropy(logits, b.tokens_BL), b.label_B.shape[0] * ed


RUN_RECORD = "run.json"


def trained_backbone(ecm_path: str | Path) -> tuple[Path | None, Path | None]:
    """The (VQVAE, VAR) checkpoints that ``ecm_path``'s run recorded in the ``run.json`` beside it.

    None stands for the embedded default (also when no record is there). Recorded files that are
    gone are a one-line error naming them: the adapters belong to that backbone alone.
    """
    record = Path(ecm_path).parent / RUN_RECORD
    try:
        used = json.loads(record.read_text())
    except (OSError, ValueError):
        return None, None
    paths = [None if used.get(k, "default") == "default" else Path(used[k]) for k in ("vae", "var")]
    gone = [str(p) for p in paths if p is not None and not p.is_file()]
    if gone:
        raise CheckpointError(f"the adapters {ecm_path} were trained on the backbone {' and '.join(map(str, paths))} "
                              f"(recorded in {record}), but {', '.join(gone)} {'is' if len(gone) == 1 else 'are'} "
                              "gone; pass --vae and --var with that backbone")
    return paths[0], paths[1]


def train_ecm(ecm: ECM, var: VAR, data: ControlData | Batches, out_dir: Path, spec: TrainSpec, control: str,
              early_centric: float, control_drop: float, dist: Dist | None = None, resume: bool = False) -> list[dict]:
    """Train the adapters into ``out_dir/ecm.safetensors``; the backbone is checked to stay frozen.

    ``data``: samples held in memory (drawn with replacement, early-centric by ``early_centric``) or
    batches streamed from a cache (:class:`ecm.train.stream.StreamBatches`, which draw the cut themselves).
    With ``resume``, ``ecm`` must have the config of the run's checkpoint (see :func:`load_ecm`).
    """
    dist = dist or Dist()
    var.eval().requires_grad_(False)
    backbone_hash, exact_before = tensor_hash(var.state_dict()), tensor_hash(var.state_dict(), exact=True)
    path = Path(out_dir) / "ecm.safetensors"
    resume_from = None
    if resume:
        saved, meta = load_ecm(path, var)
        if saved.config != ecm.config or meta.get("control") != control:
            raise CheckpointError(f"{path} was trained with another ECM config or control ({meta.get('control')}); "
                                  "resume with the run's original options")
        ecm.load_state_dict(saved.state_dict())
        resume_from = int(meta["step"])

    def save(step: int) -> None:
        save_ecm(ecm, path, backbone_hash, control, step,
                 {"early_centric": early_centric, "spec": asdict(spec)})

    if isinstance(data, ControlData):
        data = InMemoryBatches(data, spec.batch, dist, early_centric, var.patch_nums)
    task = ECMTask(ecm.train(), var, data, dist, control_drop)
    records = fit(task, spec, Path(out_dir), save, f"ecm-{control}", dist, resume_from)
    if any(p.grad is not None for p in var.parameters()) or tensor_hash(var.state_dict(), exact=True) != exact_before:
        raise RuntimeError("the frozen backbone received a gradient or changed during ECM training")
    return records
