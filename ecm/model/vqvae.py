"""The multi-scale residual VQVAE of VAR: encoder, decoder, and the quantizer with phi.

Module and parameter names follow the official code so that ``vae_ch160v4096z32.pth`` loads with
``strict=True``. Resampling uses the exact matrix forms in :mod:`ecm.model.interpolate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ecm.model import interpolate
from ecm.model.checkpoint import build_and_load, config_from_meta, infer_vqvae_config, read_checkpoint
from ecm.model.config import VQVAEConfig
from ecm.runtime.scales import phi_table


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1-projected) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        w_BLL = torch.softmax((q.transpose(1, 2) @ k) * C**-0.5, dim=2)
        h = (v @ w_BLL.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 conv with the official asymmetric (right / bottom) padding."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x up-sampling, then a conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, optional attention, resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """Res block, attention, res block at the lowest resolution."""

    def __init__(self, ch: int, attn: bool, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups) if attn else nn.Identity()
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, z_channels, H / 2^(levels-1), W / 2^(levels-1))."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        mult = (1, *cfg.ch_mult)
        last = len(cfg.ch_mult) - 1
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            ch_in, ch_out = cfg.ch * mult[i], cfg.ch * mult[i + 1]
            g = cfg.norm_groups
            blocks = [ResnetBlock(ch_in if j == 0 else ch_out, ch_out, g) for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(ch_out, g) for _ in blocks] if (i == last and cfg.using_sa) else []
            level = _Level(blocks, attns)
            if i != last:
                level.downsample = Downsample(ch_out)
            self.down.append(level)
        ch = cfg.ch * cfg.ch_mult[-1]
        self.mid = _Mid(ch, cfg.using_mid_sa, cfg.norm_groups)
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent -> image, mirroring the encoder (one more res block per level)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        last = len(cfg.ch_mult) - 1
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = _Mid(ch, cfg.using_mid_sa, cfg.norm_groups)
        g = cfg.norm_groups
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            ch_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(ch if j == 0 else ch_out, ch_out, g) for j in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(ch_out, g) for _ in blocks] if (i == last and cfg.using_sa) else []
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(ch_out)
            levels.insert(0, level)
            ch = ch_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h), with r = 0.5 in the released model."""

    def __init__(self, ch: int, ratio: float):
        super().__init__(ch, ch, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw * (1 - self.ratio) + super().forward(h_BChw) * self.ratio


class PhiShared(nn.Module):
    """``num_phi`` phi convs shared over the scales through the fixed :func:`phi_table`."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(cfg.z_channels, cfg.quant_resi) for _ in range(cfg.share_quant_resi))
        self.table = phi_table(len(cfg.patch_nums), cfg.share_quant_resi)

    def __getitem__(self, si: int) -> Phi:
        return self.qresi_ls[self.table[si]]


class MultiScaleQuantizer(nn.Module):
    """Residual quantization over the scales, one codebook shared by all of them."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        if cfg.share_quant_resi < 2:
            raise ValueError("only partially shared phi (share_quant_resi >= 2) is supported, as released")
        self.patch_nums = cfg.patch_nums
        self.Cvae = cfg.z_channels
        self.vocab_size = cfg.vocab_size
        self.beta = cfg.beta
        self.quant_resi = PhiShared(cfg)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)

    @property
    def HW(self) -> int:
        return self.patch_nums[-1]

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the L2-nearest codebook entry of each row."""
        E_VC = self.embedding.weight
        d_NV = z_NC.square().sum(1, keepdim=True) + E_VC.square().sum(1)
        d_NV = torch.addmm(d_NV, z_NC, E_VC.T, alpha=-2, beta=1)
        return d_NV.argmin(dim=1)

    def split(self, tokens_BL: torch.Tensor) -> list[torch.Tensor]:
        """Flat tokens (B, L) -> one (B, pn*pn) token map per scale; a prefix of the scales gives their maps."""
        sizes = [pn * pn for pn in self.patch_nums]
        k = next((k for k in range(1, len(sizes) + 1) if sum(sizes[:k]) == tokens_BL.shape[1]), None)
        if k is None:
            raise ValueError(f"{tokens_BL.shape[1]} tokens are not the first scales of {self.patch_nums}")
        return list(tokens_BL.split(sizes[:k], dim=1))

    def embed(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """Codebook vectors of a pn x pn token map: (B, pn*pn) -> (B, Cvae, pn, pn)."""
        return self.embedding(idx_Bl).transpose(1, 2).reshape(idx_Bl.shape[0], self.Cvae, pn, pn)

    def upsampled_residual(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        """phi_si(bicubic(h -> HW)): what scale si adds to f_hat."""
        return self.quant_resi[si](interpolate.bicubic(h_BChw, self.HW))

    @torch.no_grad()
    @torch.autocast("cuda", enabled=False)
    def f_to_idxBl(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Quantize a latent into one token map per scale, coarse to fine (always in fp32)."""
        B, C = f_BChw.shape[:2]
        f_rest = f_BChw.detach().float().clone()
        idx_list = []
        for si, pn in enumerate(self.patch_nums):
            z_NC = interpolate.area(f_rest, pn).permute(0, 2, 3, 1).reshape(-1, C)
            idx_Bl = self.nearest_code(z_NC).view(B, pn * pn)
            f_rest -= self.upsampled_residual(si, self.embed(idx_Bl, pn))
            idx_list.append(idx_Bl)
        return idx_list

    def idxBl_to_fhat(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Sum of every scale's upsampled, phi-refined code map: the latent f_hat."""
        f_hat = torch.zeros(idx_list[0].shape[0], self.Cvae, self.HW, self.HW, device=idx_list[0].device)
        for si, (idx_Bl, pn) in enumerate(zip(idx_list, self.patch_nums)):
            f_hat = f_hat + self.upsampled_residual(si, self.embed(idx_Bl, pn))
        return f_hat

    def next_input(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale si's codes to f_hat and area-sample it to the next scale's size.

        Returns ``(f_hat, next_BCpp)``; after the last scale ``next_BCpp`` is f_hat itself.
        """
        f_hat = f_hat + self.upsampled_residual(si, h_BChw)
        pn_next = self.patch_nums[min(si + 1, len(self.patch_nums) - 1)]
        return f_hat, interpolate.area(f_hat, pn_next)

    @torch.autocast("cuda", enabled=False)
    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass (fp32): quantized latent with a straight-through gradient, and the VQ loss.

        The loss averages, over the scales, the codebook term ``|sg(f) - f_hat|^2`` and the
        commitment term ``beta |f - sg(f_hat)|^2`` of the partial reconstruction.
        """
        f_BChw = f_BChw.float()
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        loss = f_BChw.new_zeros(())
        residuals = []
        for si, pn in enumerate(self.patch_nums):
            z_NC = interpolate.area(f_rest, pn).permute(0, 2, 3, 1).reshape(-1, self.Cvae)
            idx_Bl = self.nearest_code(z_NC.detach()).view(f_BChw.shape[0], pn * pn)
            if self.training:
                hits = torch.bincount(idx_Bl.flatten(), minlength=self.vocab_size).float()
                self.ema_vocab_hit_SV[si].mul_(0.9).add_(hits, alpha=0.1)
                residuals.append(z_NC.detach())
            h_BChw = self.upsampled_residual(si, self.embed(idx_Bl, pn))
            f_hat = f_hat + h_BChw
            f_rest = f_rest - h_BChw.detach()
            loss = loss + F.mse_loss(f_hat, f_BChw.detach()) + self.beta * F.mse_loss(f_hat.detach(), f_BChw)
        if self.training:
            self._recent_residuals = torch.cat(residuals)
        return (f_hat.detach() - f_BChw.detach()) + f_BChw, loss / len(self.patch_nums)

    @torch.no_grad()
    def restart_dead_codes(self, min_hits: float = 0.03) -> int:
        """Move codes that (almost) no scale uses onto residuals seen in the last training batch.

        Keeps the codebook alive while training from scratch; returns how many codes moved.
        """
        pool = getattr(self, "_recent_residuals", None)
        dead = (self.ema_vocab_hit_SV.sum(0) < min_hits).nonzero().flatten()
        if pool is None or len(dead) == 0:
            return 0
        pick = torch.randint(0, pool.shape[0], (len(dead),), device=pool.device)
        self.embedding.weight[dead] = pool[pick] + 0.01 * pool.std() * torch.randn_like(pool[pick])
        self.ema_vocab_hit_SV[:, dead] = 1.0  # give them time to be picked before judging again
        return len(dead)

    @torch.autocast("cuda", enabled=False)
    def idxBl_to_var_input(self, idx_list: list[torch.Tensor], num_scales: int | None = None) -> torch.Tensor:
        """Teacher-forcing input of VAR: the inputs of scales 1..K-1, (B, L - first_l, Cvae).

        With ``num_scales`` only the inputs of scales 1..num_scales-1 (needs that many - 1 token maps).
        """
        B = idx_list[0].shape[0]
        f_hat = torch.zeros(B, self.Cvae, self.HW, self.HW, device=idx_list[0].device)
        inputs = []
        for si in range((num_scales or len(self.patch_nums)) - 1):
            f_hat, next_BCpp = self.next_input(si, f_hat, self.embed(idx_list[si], self.patch_nums[si]))
            inputs.append(next_BCpp.flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)


class VQVAE(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] <-> token maps per scale <-> latent f_hat."""

    def __init__(self, cfg: VQVAEConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or VQVAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, padding=ks // 2)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.config.patch_nums

    def img_to_f(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Continuous latent before quantization."""
        return self.quant_conv(self.encoder(img_B3HW))

    @torch.no_grad()
    def img_to_idxBl(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Tokens of every scale, coarse to fine: a list of (B, pn*pn) int64."""
        return self.quantize.f_to_idxBl(self.img_to_f(img_B3HW))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode a latent to an image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def idxBl_to_img(self, idx_list: list[torch.Tensor], same_shape: bool = True,
                     last_one: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """Decode the tokens of all scales to an image in [-1, 1].

        ``last_one=False`` returns the image after every scale (coarse to fine), as the official
        method does; ``same_shape`` is accepted for its signature (only True is supported).
        """
        if not same_shape:
            raise ValueError("same_shape=False (experimental in the official code) is not supported")
        if last_one:
            return self.fhat_to_img(self.quantize.idxBl_to_fhat(idx_list))
        return [self.fhat_to_img(self.quantize.idxBl_to_fhat(idx_list[: k + 1])) for k in range(len(idx_list))]

    def img_to_reconstructed_img(self, img_B3HW: torch.Tensor,
                                 last_one: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """Encode, quantize over all scales, decode (every scale's image with ``last_one=False``)."""
        return self.idxBl_to_img(self.img_to_idxBl(img_B3HW), last_one=last_one)

    def forward(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: reconstruction (straight-through quantization) and the VQ loss."""
        f_hat, vq_loss = self.quantize(self.img_to_f(img_B3HW))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss

    @classmethod
    def from_checkpoint(cls, source: str | Path | dict[str, Any], **overrides: Any) -> VQVAE:
        """Load an official ``vae_*.pth`` or one of ours; the config is inferred from the shapes.

        A flat state dict does not record ``patch_nums`` (ten scales are taken to be the official
        ones) or ``norm_groups`` (32, as released): pass them as overrides for other models.
        """
        state, meta = read_checkpoint(source, lazy=True)
        if "config" in meta:
            cfg = config_from_meta(meta, "vqvae", VQVAEConfig, overrides)
        else:
            cfg = infer_vqvae_config(state, **overrides)
        return build_and_load(lambda: cls(cfg), state, "VQVAE")
