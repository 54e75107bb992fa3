"""The deployable networks, as modules whose forward is exactly what gets exported.

* :class:`StepGraph` - one scale of backbone + every control's merged adapters (weighted by a graph
  input), plus everything that happens between two scales (CFG, temperature, top-k/top-p,
  inverse-CDF sampling, the known tokens kept when inpainting, codebook lookup, the f_hat update
  and the next scale's input). One graph serves every scale: the scale-specific constants
  (resampling matrices, phi choice, cfg ramp, temperature) are small inputs, the KV cache comes in
  as ``past_k/past_v`` and this scale's keys and values go out as ``new_k/new_v``.
* :class:`ControlGraph` - one control's encoder: uint8 condition image -> control tokens of all scales.
* :class:`EncoderGraph` - the VQVAE encoder and multi-scale quantizer: uint8 image -> its tokens and latent.
* :class:`DecoderGraph` - the VQVAE decoder: f_hat -> uint8 RGB image.

Each reuses the model's own modules (``VAR.run_blocks``, ``ControlMix.injector``, ``sample_tokens``,
``keep_known``, the quantizer's phi convs), so eager generation and the exported graph compute the
same function.
Tensor names and shapes are those of :class:`ecm.runtime.manifest.Manifest`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from ecm.export.fold import ClassTable

from ecm.model import interpolate
from ecm.model.adapters import ECM, ControlMix
from ecm.model.inpaint import composite, encode_known, keep_known
from ecm.model.pixels import to_model_range, to_pixels
from ecm.model.sampler import sample_tokens
from ecm.model.var import VAR
from ecm.model.vqvae import VQVAE


class StackedCache:
    """The KV cache as graph tensors, duck-typed like :class:`ecm.kv_cache.KVCache`.

    ``past_k``/``past_v`` are (b, N, 2B, H, c): sequence first, so that each scale's slice of the
    runtime's one preallocated cache is contiguous. Keys and values are stored in the cache's
    dtype (fp16 in reduced-precision exports) and attended to in fp32.
    """

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor):
        self.past_k, self.past_v = past_k, past_v
        self.new_k: dict[int, torch.Tensor] = {}
        self.new_v: dict[int, torch.Tensor] = {}

    def update(self, layer: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for past, new, store in ((self.past_k, k_BHlc, self.new_k), (self.past_v, v_BHlc, self.new_v)):
            store[layer] = new.to(past.dtype)
            past_BHbc = past[:, layer].permute(1, 2, 0, 3)
            out.append(torch.cat((past_BHbc, store[layer]), dim=2).float())
        return out[0], out[1]

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This scale's keys and values of all layers, (l, N, 2B, H, c)."""
        return tuple(torch.stack([store[n] for n in sorted(store)]).permute(3, 0, 1, 2, 4)
                     for store in (self.new_k, self.new_v))


class StepGraph(nn.Module):
    """One scale of generation with a static KV shape per scale; see the module docstring."""

    def __init__(self, var: VAR, mix: ControlMix | None, candidates: int):
        super().__init__()
        self.var, self.candidates = var, candidates
        self.mix = mix
        self.ecms = nn.ModuleList(mix.ecms if mix is not None else [])  # registered, so casts and counts see them
        self.quant = var.vae.quantize
        if var.patch_nums[0] != 1:
            raise ValueError("export needs a first scale of 1x1 tokens, as in every released VAR")

    def forward(self, label: torch.Tensor, x_in: torch.Tensor, f_hat: torch.Tensor, past_k: torch.Tensor,
                past_v: torch.Tensor, u: torch.Tensor, up: torch.Tensor, down: torch.Tensor, phi: torch.Tensor,
                first: torch.Tensor, cfg: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, known: torch.Tensor, keep: torch.Tensor, f_known: torch.Tensor,
                keep_f: torch.Tensor, ctrl: torch.Tensor | None = None, control_weight: torch.Tensor | None = None,
                past_ak: torch.Tensor | None = None, past_av: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        var = self.var
        b, pn = past_k.shape[0], x_in.shape[-1]
        label_2B = torch.cat((label, torch.full_like(label, var.num_classes)))
        cond_2BD = var.class_cond(label_2B)
        # with AdaLN tables (export.fold.fold_class_tables) the norms look their modulation up by label
        modulate = label_2B if isinstance(var.head_nm.ada_lin, ClassTable) else cond_2BD
        # Scale 0 starts from the class embedding (``first`` = 1); later scales from the latent.
        words_BlC = var.word_embed(x_in.flatten(2).transpose(1, 2))
        sos_2B1C = cond_2BD.unsqueeze(1) + var.pos_start
        x_2BlC = torch.cat((words_BlC, words_BlC)) * (1 - first) + sos_2B1C * first
        x_2BlC = x_2BlC + var.lvl_pos()[:, b:b + pn * pn]

        cache = StackedCache(past_k, past_v)
        inject = adapter_cache = None
        if self.mix is not None:
            ctrls_2BlD = []
            for ctrl_lBD in ctrl[:, b:b + pn * pn].unbind(0):  # this scale's tokens of each control
                ctrl_BlD = ctrl_lBD.transpose(0, 1)
                ctrls_2BlD.append(torch.cat((ctrl_BlD, torch.zeros_like(ctrl_BlD))))  # CFG's unconditional rows: none
            adapter_cache = StackedCache(past_ak, past_av)
            inject = self.mix.injector(ctrls_2BlD, control_weight, adapter_cache)
        logits_2BlV = var.logits(var.run_blocks(x_2BlC, modulate, None, cache, inject), modulate)

        idx_Bl = sample_tokens(logits_2BlV, u.flatten(1), cfg_t=cfg, temperature=temperature, top_k=top_k,
                               top_p=top_p, candidates=self.candidates)
        idx_Bl = keep_known(idx_Bl, known.flatten(0, 1).transpose(0, 1), keep.flatten(0, 1).transpose(0, 1) > 0.5)
        up_BChw = interpolate.separable(up, self.quant.embed(idx_Bl, pn))
        phis = self.quant.quant_resi.qresi_ls
        f_hat_out = f_hat + sum(phi[i] * phis[i](up_BChw) for i in range(len(phis)))
        f_hat_out = composite(f_hat_out, f_known, keep_f > 0.5)
        x_next = interpolate.separable(down, f_hat_out)
        outputs = (logits_2BlV, idx_Bl, f_hat_out, x_next, *cache.outputs())
        return outputs if adapter_cache is None else (*outputs, *adapter_cache.outputs())


class ControlGraph(nn.Module):
    """uint8 condition (B, R, R, 3) -> control tokens of every scale, sequence first (L, B, D)."""

    def __init__(self, ecm: ECM):
        super().__init__()
        self.ecm = ecm

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.ecm.control_tokens(to_model_range(cond)).transpose(0, 1)


class EncoderGraph(nn.Module):
    """uint8 image (B, R, R, 3) -> its tokens of every scale, sequence first (L, B), and its latent f_hat."""

    def __init__(self, vae: VQVAE):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx_list, f_hat = encode_known(self.vae, to_model_range(image))
        return torch.cat(idx_list, dim=1).transpose(0, 1), f_hat


class DecoderGraph(nn.Module):
    """f_hat (B, Cvae, hw, hw) -> uint8 RGB image (B, H, W, 3), ready to be written as PNG."""

    def __init__(self, vae: VQVAE):
        super().__init__()
        self.vae = vae

    def forward(self, f_hat: torch.Tensor) -> torch.Tensor:
        return to_pixels(self.vae.fhat_to_img(f_hat) * 0.5 + 0.5)
