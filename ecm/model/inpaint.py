"""Zero-shot inpainting and outpainting: generation teacher-forced on a known image's tokens where a mask keeps them.

The known image is encoded once into its tokens at every scale (VQVAE encoder, multi-scale
quantizer) and its latent f_hat. At each scale the sampled tokens are replaced by the known ones
wherever :func:`ecm.runtime.inpaint.keep_masks` keeps them, so every later scale sees the known
content; after the last scale the latent itself is the known one there, and the pixels with nothing
to generate are the VQVAE's reconstruction of the image (the decoder's attention and convolutions
reach across the border, so decoding the composite latent alone would let the generated part
bleed into them). Eager generation and the exported graphs and runtime run these same rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ecm.model.vqvae import VQVAE
from ecm.runtime.inpaint import keep_masks, kept_pixels


def encode_known(vae: VQVAE, image_B3HW: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Tokens of every scale, (B, pn*pn) each, and the latent f_hat they make, of images in [-1, 1]."""
    idx_list = vae.quantize.f_to_idxBl(vae.img_to_f(image_B3HW))
    return idx_list, vae.quantize.idxBl_to_fhat(idx_list)


def keep_known(idx_Bl: torch.Tensor, known_Bl: torch.Tensor, keep_Bl: torch.Tensor) -> torch.Tensor:
    """The sampled tokens with the known ones where ``keep_Bl`` (bool) says so."""
    return torch.where(keep_Bl, known_Bl, idx_Bl)


def composite(f_hat: torch.Tensor, f_known: torch.Tensor, keep_B1hw: torch.Tensor) -> torch.Tensor:
    """The final latent: the known image's where ``keep_B1hw`` (bool, the last scale's grid) says so."""
    return torch.where(keep_B1hw, f_known, f_hat)


@dataclass
class Known:
    """An image to keep: its tokens per scale, which of them each scale keeps, its latent and the pixels kept."""

    idx_list: list[torch.Tensor]  # (B, pn*pn) int64 per scale
    keep_list: list[torch.Tensor]  # (B, pn*pn) bool per scale
    f_hat: torch.Tensor  # (B, Cvae, HW, HW)
    keep_pixels: torch.Tensor  # (B, 1, R, R) bool

    @classmethod
    @torch.no_grad()
    def encode(cls, vae: VQVAE, image_B3HW: torch.Tensor, generate_BRR: np.ndarray) -> Known:
        """Encode images in [-1, 1]; ``generate_BRR`` is 1 where to generate, 0 where to keep (fractions
        between: a resized mask's edge)."""
        idx_list, f_hat = encode_known(vae, image_B3HW)
        keeps = [torch.from_numpy(k).to(f_hat.device) for k in keep_masks(generate_BRR, vae.patch_nums)]
        pixels = torch.from_numpy(kept_pixels(generate_BRR)).unsqueeze(1).to(f_hat.device)
        return cls(idx_list, keeps, f_hat, pixels)

    def latent_keep(self) -> torch.Tensor:
        """The last scale's keep mask on the latent grid, (B, 1, HW, HW)."""
        HW = self.f_hat.shape[-1]
        return self.keep_list[-1].view(-1, 1, HW, HW)

    def paste(self, vae: VQVAE, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Decoded images in [0, 1] with the kept pixels replaced by the known image's reconstruction."""
        return torch.where(self.keep_pixels, vae.fhat_to_img(self.f_hat) * 0.5 + 0.5, images_B3HW)
