"""``ecm-pretrain``: a small VQVAE, then a VAR backbone on its tokens, trained from scratch.

This is how the embedded default model is made (the official weights cannot be fetched here),
and it serves users with a domain of their own. Losses: L1 + L2 reconstruction and the VQ loss
for the VQVAE; teacher-forced cross-entropy with class dropout for VAR.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ecm.data.cache import index_dtype
from ecm.data.datasets import InMemory
from ecm.model.checkpoint import checkpoint_step, save_model
from ecm.model.config import VARConfig, VQVAEConfig
from ecm.model.pixels import to_model_range
from ecm.model.var import VAR
from ecm.model.vqvae import VQVAE
from ecm.train.loop import Dist, TrainSpec, batch_indices, cross_entropy, fit


class VQVAETask(nn.Module):
    """Reconstruction (L1 + L2) and VQ loss of one batch, with dead-code restarts every 20 steps."""

    def __init__(self, vae: VQVAE, data: InMemory, batch: int, dist: Dist):
        super().__init__()
        self.vae, self.data, self.batch, self.dist = vae, data, batch, dist

    def forward(self, step: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        idx = batch_indices(rng, len(self.data), self.batch, self.dist)
        img = to_model_range(self.data.images[idx]).to(self.dist.device)
        if step % 20 == 19:  # revive unused codes on this batch's residuals
            with torch.no_grad():
                self.vae.quantize(self.vae.img_to_f(img))
            self.vae.quantize.restart_dead_codes()
            if self.dist.world > 1:  # every rank continues from rank 0's codebook
                torch.distributed.broadcast(self.vae.quantize.embedding.weight.data, src=0)
        rec, vq_loss = self.vae(img)
        loss = F.l1_loss(rec, img) + F.mse_loss(rec, img) + vq_loss
        return loss, img.shape[0] * self.vae.config.patch_nums[-1] ** 2


@torch.no_grad()
def tokenize(vae: VQVAE, images_NHW3: np.ndarray, batch: int = 64, show: bool = True) -> torch.Tensor:
    """Tokens of every image, all scales flattened: (N, L), int16 when the codebook allows.

    The VQVAE is frozen wherever this is used, so each image is encoded once, not every step.
    ``show``: a progress bar.
    """
    device = next(vae.parameters()).device
    dtype = getattr(torch, index_dtype(vae.config.vocab_size).name)  # the caches' rule: int16 for 4096 codes
    chunks = []
    for b in tqdm(range(0, len(images_NHW3), batch), desc="tokenizing", unit="batch", disable=not show,
                  dynamic_ncols=True):
        img = to_model_range(images_NHW3[b:b + batch]).to(device)
        chunks.append(torch.cat(vae.img_to_idxBl(img), dim=1).to(dtype).cpu())
    return torch.cat(chunks)


class VARTask(nn.Module):
    """Teacher-forced cross-entropy of one batch against the frozen VQVAE's tokens."""

    def __init__(self, var: VAR, vae: VQVAE, data: InMemory, batch: int, dist: Dist):
        super().__init__()
        self.var, self.labels, self.batch, self.dist = var, data.labels, batch, dist
        self.vae = (vae.eval().requires_grad_(False),)  # frozen, outside the trained module
        self.tokens_NL = tokenize(vae, data.images)

    def forward(self, step: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        idx = batch_indices(rng, len(self.labels), self.batch, self.dist)
        label = torch.from_numpy(self.labels[idx]).to(self.dist.device)
        tokens_BL = self.tokens_NL[idx].long().to(self.dist.device)
        quant = self.vae[0].quantize
        with torch.no_grad():
            x_BLCv = quant.idxBl_to_var_input(quant.split(tokens_BL))
        logits = self.var(label, x_BLCv)
        return cross_entropy(logits, tokens_BL), logits.shape[0] * logits.shape[1]


def pretrain(data: InMemory, out_dir: Path, vae_cfg: VQVAEConfig, var_cfg: VARConfig, vae_spec: TrainSpec,
             var_spec: TrainSpec, dist: Dist | None = None, resume: bool = False) -> tuple[VQVAE, VAR]:
    """Train both stages into ``out_dir/vqvae.safetensors`` and ``out_dir/var.safetensors``.

    With ``resume`` each stage continues from its last checkpoint (a finished stage is kept).
    """
    out_dir, dist = Path(out_dir), dist or Dist()
    vae_path, var_path = out_dir / "vqvae.safetensors", out_dir / "var.safetensors"

    torch.manual_seed(vae_spec.seed)
    vae = VQVAE(vae_cfg).to(dist.device)
    nn.init.uniform_(vae.quantize.embedding.weight, -1 / vae_cfg.vocab_size, 1 / vae_cfg.vocab_size)
    vae_from = _resume_weights(vae, vae_path, resume)
    fit(VQVAETask(vae.train(), data, vae_spec.batch, dist), vae_spec, out_dir / "vqvae",
        lambda step: save_model(vae, vae_path, "vqvae", vae_cfg, extra={"step": str(step)}), "vqvae", dist, vae_from)
    vae = vae.eval().requires_grad_(False)

    torch.manual_seed(var_spec.seed)
    var = VAR(var_cfg, vae).to(dist.device)
    var_from = _resume_weights(var, var_path, resume)
    fit(VARTask(var.train(), vae, data, var_spec.batch, dist), var_spec, out_dir / "var",
        lambda step: save_model(var, var_path, "var", var_cfg, extra={"step": str(step)}), "var", dist, var_from)
    return vae, var.eval()


def _resume_weights(model: nn.Module, path: Path, resume: bool) -> int | None:
    """Load the stage's last weights when resuming a stage that has begun; their step, else None."""
    if not (resume and (path.with_suffix("") / "train_state.pt").is_file()):
        return None
    loaded = type(model).from_checkpoint(path)
    model.load_state_dict(loaded.state_dict())
    return checkpoint_step(path)
