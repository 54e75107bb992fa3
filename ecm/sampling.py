"""Token sampling shared by eager generation and the exported step graph.

CFG mixing, temperature, top-k / top-p filtering and inverse-CDF sampling from uniforms that the
caller supplies, so that the same uniforms give the same tokens in every backend and no
Multinomial or RandomUniform op is needed.
"""

from __future__ import annotations

import torch


def cfg_weight(cfg: float, si: int, num_scales: int) -> float:
    """The official linear guidance ramp: t = cfg * si / (K - 1)."""
    return cfg * si / (num_scales - 1)


def mix_cfg(logits_2BlV: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """(1 + t) * cond - t * uncond, with the conditional rows first."""
    B = logits_2BlV.shape[0] // 2
    return (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]


def filter_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf (official semantics).

    Ties at the k-th value are kept; the most likely token always survives top-p.
    """
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth = logits_BlV.topk(top_k, dim=-1).values[..., -1:]
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits_BlV = logits_BlV.masked_fill(remove, float("-inf"))
    return logits_BlV


def sample_inverse_cdf(logits_BlV: torch.Tensor, u_Bl: torch.Tensor) -> torch.Tensor:
    """Draw one token per position: the first whose cumulative probability reaches u * total.

    ``u_Bl`` holds uniforms in (0, 1]; the chosen token always has non-zero probability.
    """
    cdf_BlV = logits_BlV.float().softmax(dim=-1).cumsum(dim=-1)
    target_Bl1 = u_Bl.unsqueeze(-1).float() * cdf_BlV[..., -1:]
    idx_Bl = (cdf_BlV < target_Bl1).sum(dim=-1)
    return idx_Bl.clamp_max(logits_BlV.shape[-1] - 1)


def sample_tokens(logits_2BlV: torch.Tensor, u_Bl: torch.Tensor, *, cfg_t: float | torch.Tensor,
                  temperature: float | torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """CFG mix, temperature, top-k/top-p, inverse-CDF sample: (2B, l, V) logits -> (B, l) tokens."""
    logits_BlV = mix_cfg(logits_2BlV.float(), cfg_t) / temperature
    return sample_inverse_cdf(filter_top_k_top_p(logits_BlV, top_k, top_p), u_Bl)
