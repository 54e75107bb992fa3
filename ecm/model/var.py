"""The VAR transformer: next-scale prediction with AdaLN blocks and block-causal attention.

Parameter names follow the official code so that ``var_d16.pth`` ... ``var_d30.pth`` load with
``strict=True`` and compute the same function. Two ways to run it:

* :meth:`VAR.forward` - teacher forcing over all L tokens with the block-causal mask (training);
* :meth:`VAR.step` - one scale against a preallocated :class:`KVCache` (generation, export).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn as nn

from ecm.model.checkpoint import build_and_load, config_from_meta, infer_var_config, read_checkpoint
from ecm.model.config import VARConfig
from ecm.model.inpaint import Known, composite, keep_known
from ecm.model.kv_cache import KVCache
from ecm.model.layers import FFN, Injector, SelfAttention
from ecm.model.sampler import cfg_weight, sample_tokens
from ecm.runtime.errors import CheckpointError
from ecm.runtime.sampling import (
    DEFAULT_CFG,
    DEFAULT_ECM_TEMPERATURE,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    draw_uniforms,
)
from ecm.runtime.scales import begin_ends
from ecm.runtime.schedule import TemperatureSchedule, parse_temperature

if TYPE_CHECKING:
    from ecm.model.vqvae import VQVAE

class ScaleControl(Protocol):
    """One generation's control, scale by scale: what :meth:`VAR.step` asks of it (ECM's MixState)."""

    def injector(self, si: int) -> Injector: ...

    def advance(self, num_tokens: int) -> None: ...


class Steering(Protocol):
    """A control module as generation uses it (:class:`ecm.model.adapters.ECM`, one control image per row, or
    :class:`ecm.model.adapters.ControlMix`, a list of them): per-generation state from its control images."""

    def start(self, ctrl: Any) -> ScaleControl: ...


class TeacherSteering(Protocol):
    """A control module as teacher forcing uses it (:class:`ecm.model.adapters.ECM`): an injector over given
    control tokens."""

    def injector(self, ctrl_BlD: torch.Tensor, attn_bias: torch.Tensor | None = None,
                 cache: KVCache | None = None) -> Injector: ...


class AdaLNSelfAttn(nn.Module):
    """Transformer block whose LayerNorms are modulated by the class condition (AdaLN)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.attn = SelfAttention(cfg.embed_dim, cfg.num_heads)
        self.ffn = FFN(C, cfg.mlp_hidden)
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x_BlC: torch.Tensor, cond_BD: torch.Tensor, attn_bias: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        h = self.ln_wo_grad(x_BlC) * (scale1 + 1) + shift1
        x_BlC = x_BlC + self.attn(h, attn_bias, cache, layer) * gamma1
        h = self.ln_wo_grad(x_BlC) * (scale2 + 1) + shift2
        return x_BlC + self.ffn(h) * gamma2


class AdaLNBeforeHead(nn.Module):
    """The head's AdaLN: LayerNorm modulated by (scale, shift) from the class condition."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.C = cfg.embed_dim
        self.ln_wo_grad = nn.LayerNorm(self.C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(self.C, 2 * self.C))

    def forward(self, x_BlC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BlC) * (scale + 1) + shift


@dataclass
class Generation:
    """What :meth:`VAR.generate` returns."""

    idx_list: list[torch.Tensor]  # tokens per scale, each (B, pn*pn)
    f_hat: torch.Tensor  # final latent (B, Cvae, HW, HW)
    images: torch.Tensor | None  # (B, 3, H, W) in [0, 1], or None with decode=False
    # with trace=True, per scale: logits (2B, pn*pn, V), the input latent (B, Cvae, pn, pn) and f_hat before it
    logits: list[torch.Tensor] = field(default_factory=list)
    x_in: list[torch.Tensor] = field(default_factory=list)
    f_hat_in: list[torch.Tensor] = field(default_factory=list)


class VAR(nn.Module):
    """Class-conditional next-scale prediction over the token pyramid of a :class:`VQVAE`."""

    def __init__(self, cfg: VARConfig | None = None, vae: VQVAE | None = None):
        super().__init__()
        self.config = cfg = cfg or VARConfig()
        C, L = cfg.embed_dim, cfg.L
        self.patch_nums = cfg.patch_nums
        self.begin_ends = begin_ends(cfg.patch_nums)
        self.first_l = cfg.patch_nums[0] ** 2
        self.num_classes = cfg.num_classes
        self.cond_drop_rate = cfg.cond_drop_rate
        self._vae: tuple[VQVAE, ...] = ()
        if vae is not None:
            self.attach_vae(vae)

        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg) for _ in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = nn.Linear(C, cfg.vocab_size)

        lvl = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(cfg.patch_nums)])
        self.register_buffer("lvl_1L", lvl.view(1, L))
        causal = lvl.view(L, 1) >= lvl.view(1, L)  # a token sees its own and all earlier scales
        bias = torch.zeros(L, L).masked_fill(~causal, float("-inf"))
        self.register_buffer("attn_bias_for_masking", bias.view(1, 1, L, L))
        self.init_weights()

    # ----------------------------------------------------------------------------- set-up
    @property
    def vae(self) -> VQVAE:
        """The VQVAE whose tokens this VAR predicts (not part of the VAR state dict)."""
        if not self._vae:
            raise RuntimeError("this VAR has no VQVAE attached; pass vae= or call attach_vae(vae)")
        return self._vae[0]

    def attach_vae(self, vae: VQVAE) -> None:
        """Use ``vae`` for generation; its codebook and scales must match this VAR."""
        vc = vae.config
        got = (vc.vocab_size, vc.z_channels, tuple(vc.patch_nums))
        want = (self.config.vocab_size, self.config.Cvae, tuple(self.config.patch_nums))
        if got != want:
            raise ValueError(f"VQVAE (vocab, Cvae, patch_nums) = {got} does not match this VAR's {want}")
        self._vae = (vae,)

    @torch.no_grad()
    def init_weights(self, init_std: float = -1, init_head: float = 0.02, init_adaln: float = 0.5,
                     init_adaln_gamma: float = 1e-3) -> None:
        """Initialisation for training from scratch, following the official recipe."""
        std = init_std if init_std > 0 else (1 / self.config.embed_dim / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_1LC, std=std)
        self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        C, depth = self.config.embed_dim, self.config.depth
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            block.ada_lin[-1].weight[2 * C:].mul_(init_adaln)
            block.ada_lin[-1].weight[: 2 * C].mul_(init_adaln_gamma)

    def new_cache(self, batch: int, dtype: torch.dtype = torch.float32) -> KVCache:
        """A KV cache for ``batch`` rows (2B with CFG) over all L positions of every block."""
        cfg = self.config
        return KVCache(cfg.depth, batch, cfg.num_heads, cfg.L, cfg.head_dim, self.pos_1LC.device, dtype)

    # ----------------------------------------------------------------------------- pieces
    def lvl_pos(self) -> torch.Tensor:
        """Level embedding + absolute position embedding, (1, L, C)."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def class_cond(self, label_B: torch.Tensor) -> torch.Tensor:
        """Class embedding; label ``num_classes`` is the unconditional class."""
        return self.class_emb(label_B)

    def first_token_map(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """Input of scale 0: class embedding + start position + level/position embedding."""
        B = cond_BD.shape[0]
        sos = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        return sos + self.lvl_pos()[:, : self.first_l]

    def embed_scale(self, si: int, f_BCpp: torch.Tensor) -> torch.Tensor:
        """Input tokens of scale si from the area-sampled latent (B, Cvae, pn, pn)."""
        b, e = self.begin_ends[si]
        return self.word_embed(f_BCpp.flatten(2).transpose(1, 2)) + self.lvl_pos()[:, b:e]

    def logits(self, h_BlC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """AdaLN + vocabulary head, in fp32."""
        return self.head(self.head_nm(h_BlC.float(), cond_BD).float()).float()

    def run_blocks(self, x_BlC: torch.Tensor, cond_BD: torch.Tensor, attn_bias: torch.Tensor | None = None,
                   cache: KVCache | None = None, inject: Injector | None = None) -> torch.Tensor:
        """All transformer blocks, either masked (teacher forcing) or cached (one scale).

        ``inject(i, h)`` runs after block i: that is where ECM adapters add their control.
        """
        for i, block in enumerate(self.blocks):
            x_BlC = block(x_BlC, cond_BD, attn_bias, cache, i)
            if inject is not None:
                x_BlC = inject(i, x_BlC)
        return x_BlC

    # ----------------------------------------------------------------------------- forward
    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, ecm: TeacherSteering | None = None,
                ctrl_BLD: torch.Tensor | None = None, num_scales: int | None = None,
                drop_B: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits (B, L, V) for all scales at once.

        As in the official code, labels are replaced by the unconditional class with probability
        ``cond_drop_rate`` (also in eval mode; set it to 0 for deterministic checks), or where the
        boolean ``drop_B`` says so when the caller draws the coin flips itself. With ``ecm``
        and its control tokens the adapters run too. ``num_scales`` keeps only the first scales:
        block-causal attention makes any prefix a valid sequence (early-centric training).
        """
        B = x_BLCv_wo_first_l.shape[0]
        ed = self.begin_ends[(num_scales or len(self.patch_nums)) - 1][1]
        if drop_B is None:
            drop_B = torch.rand(B, device=label_B.device) < self.cond_drop_rate
        label_B = torch.where(drop_B, self.num_classes, label_B)
        cond_BD = self.class_cond(label_B)
        x_BLCv = x_BLCv_wo_first_l[:, : ed - self.first_l].float()
        rest_BLC = self.word_embed(x_BLCv) + self.lvl_pos()[:, self.first_l:ed]
        x_BLC = torch.cat((self.first_token_map(cond_BD), rest_BLC), dim=1)
        attn_bias = self.attn_bias_for_masking[:, :, :ed, :ed]
        inject = ecm.injector(ctrl_BLD[:, :ed], attn_bias) if ecm is not None else None
        x_BLC = self.run_blocks(x_BLC, cond_BD, attn_bias, inject=inject)
        return self.logits(x_BLC, cond_BD)

    def step(self, si: int, x_BlC: torch.Tensor, cond_BD: torch.Tensor, cache: KVCache,
             control: ScaleControl | None = None) -> torch.Tensor:
        """Run scale si: (B, pn*pn, C) input tokens -> (B, pn*pn, V) logits, extending the cache(s)."""
        b, e = self.begin_ends[si]
        if cache.fill != b or x_BlC.shape[1] != e - b:
            raise ValueError(f"scale {si} expects {e - b} tokens at cache fill {b}, "
                             f"got {x_BlC.shape[1]} at fill {cache.fill}")
        inject = control.injector(si) if control is not None else None
        h_BlC = self.run_blocks(x_BlC, cond_BD, None, cache, inject)
        cache.advance(e - b)
        if control is not None:
            control.advance(e - b)
        return self.logits(h_BlC, cond_BD)

    # ----------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, label_B: torch.Tensor | list[int], *, cfg: float = DEFAULT_CFG, top_k: int = DEFAULT_TOP_K,
                 top_p: float = DEFAULT_TOP_P, temperature: str | float | TemperatureSchedule | None = None,
                 seed: int = 0, uniforms: list[np.ndarray] | None = None, decode: bool = True,
                 ecm: Steering | None = None, control_B3HW: Any = None, known: Known | None = None,
                 candidates: int | None = None, trace: bool = False) -> Generation:
        """Class-conditional generation with CFG (official linear ramp), scale by scale.

        Tokens are drawn by inverse-CDF sampling from uniforms (``draw_uniforms(seed, ...)`` unless
        given), so a seed gives the same image in every backend. ``top_k=1`` is greedy. With
        ``ecm`` and a control image per row (a list of them per control with a ``ControlMix``), the
        adapters steer every scale; CFG's unconditional rows drop both the class and the control.
        With ``known`` the tokens it keeps replace the sampled ones at every scale, its latent the
        final one where it keeps the last scale, and its reconstruction the kept pixels (inpainting).
        The temperature schedule defaults to ``DEFAULT_ECM_TEMPERATURE`` with adapters and
        ``DEFAULT_TEMPERATURE`` without.
        ``candidates`` is the sampler's static sort size (an exported graph's); ``trace`` keeps
        every scale's logits and inputs, for comparisons with exported graphs.
        """
        device = self.pos_1LC.device
        label_B = torch.as_tensor(label_B, device=device).long().view(-1)
        B, K = label_B.shape[0], len(self.patch_nums)
        if temperature is None:
            temperature = DEFAULT_ECM_TEMPERATURE if ecm is not None else DEFAULT_TEMPERATURE
        temps = parse_temperature(temperature).values(K)
        uniforms = uniforms if uniforms is not None else draw_uniforms(seed, B, self.patch_nums)
        quant = self.vae.quantize

        cond_BD = self.class_cond(torch.cat((label_B, torch.full_like(label_B, self.num_classes))))
        cache = self.new_cache(2 * B)
        control = ecm.start(control_B3HW) if ecm is not None else None
        x_BlC = self.first_token_map(cond_BD)
        f_hat = torch.zeros(B, quant.Cvae, quant.HW, quant.HW, device=device)
        out = Generation([], f_hat, None)
        next_BCpp = torch.zeros(B, quant.Cvae, 1, 1, device=device)
        for si, pn in enumerate(self.patch_nums):
            logits_2BlV = self.step(si, x_BlC, cond_BD, cache, control)
            if trace:
                out.logits.append(logits_2BlV)
                out.x_in.append(next_BCpp)
                out.f_hat_in.append(f_hat)
            u_Bl = torch.as_tensor(uniforms[si], device=device)
            idx_Bl = sample_tokens(logits_2BlV, u_Bl, cfg_t=cfg_weight(cfg, si, K), temperature=temps[si],
                                   top_k=top_k, top_p=top_p, candidates=candidates)
            if known is not None:
                idx_Bl = keep_known(idx_Bl, known.idx_list[si], known.keep_list[si])
            out.idx_list.append(idx_Bl)
            f_hat, next_BCpp = quant.next_input(si, f_hat, quant.embed(idx_Bl, pn))
            if si + 1 < K:
                x_BlC = self.embed_scale(si + 1, next_BCpp).repeat(2, 1, 1)
        if known is not None:
            f_hat = composite(f_hat, known.f_hat, known.latent_keep())
        out.f_hat = f_hat
        del cache, control  # the KV caches go before the decoder's activations come
        out.images = self.vae.fhat_to_img(f_hat) * 0.5 + 0.5 if decode else None
        if decode and known is not None:
            out.images = known.paste(self.vae, out.images)
        return out

    @torch.no_grad()
    def autoregressive_infer_cfg(self, B: int, label_B: int | torch.Tensor | None, g_seed: int | None = None,
                                 cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                                 more_smooth: bool = False) -> torch.Tensor:
        """The official entry point's signature: images (B, 3, H, W) in [0, 1].

        ``label_B`` may be a tensor, an int (negative: unconditional) or None (random classes).
        The visualisation-only Gumbel smoothing (``more_smooth=True``) is not supported.
        """
        if more_smooth:
            raise ValueError("more_smooth (Gumbel smoothing for visualisation) is not supported; use False")
        if label_B is None:
            label_B = torch.from_numpy(np.random.default_rng(g_seed).integers(0, self.num_classes, B))
        elif isinstance(label_B, int):
            label_B = torch.full((B,), self.num_classes if label_B < 0 else label_B)
        out = self.generate(label_B, cfg=cfg, top_k=top_k, top_p=top_p, temperature=1.0,
                            seed=0 if g_seed is None else g_seed)
        return out.images

    @classmethod
    def from_checkpoint(cls, source: str | Path | dict[str, Any], vae: VQVAE | None = None,
                        **overrides: Any) -> VAR:
        """Load an official ``var_d*.pth`` or one of ours; depth and width come from the shapes.

        With ``vae`` the VQVAE is attached (it must have this VAR's codebook and scales), and a flat
        state dict takes its scales from it.
        """
        state, meta = read_checkpoint(source, lazy=True)
        if "config" in meta:
            cfg = config_from_meta(meta, "var", VARConfig, overrides)
        else:
            patch_nums = overrides.pop("patch_nums", vae.config.patch_nums if vae is not None else None)
            cfg = infer_var_config(state, patch_nums, **overrides)
        model = build_and_load(lambda: cls(cfg), state, "VAR")
        if vae is not None:
            try:
                model.attach_vae(vae)
            except ValueError as e:
                raise CheckpointError(f"{e}; load the VQVAE this VAR was trained with") from None
        return model
