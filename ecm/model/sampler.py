"""Token sampling shared by eager generation and the exported step graph.

CFG mixing, temperature, top-k / top-p filtering and inverse-CDF sampling from uniforms that the
caller supplies, so that the same uniforms give the same tokens in every backend and no
Multinomial or RandomUniform op is needed. The filters work on the ``candidates`` most likely
tokens, sorted once by one TopK with a static K: that exports to ops every runtime has, and the
knobs (cfg, temperature, top-k, top-p) can be graph inputs instead of constants.
"""

from __future__ import annotations

import torch

from ecm.runtime.sampling import cfg_weight

__all__ = ["candidate_count", "cfg_weight", "flip_margins", "guided_logits", "mix_cfg", "nucleus_keep",
           "sample_inverse_cdf", "sample_tokens"]

Scalar = float | int | torch.Tensor


def candidate_count(top_k: int, vocab_size: int) -> int:
    """Tokens the sampler sorts: top_k, or the whole vocabulary when top-k is off (0)."""
    return top_k if 0 < top_k < vocab_size else vocab_size


def mix_cfg(logits_2BlV: torch.Tensor, t: Scalar) -> torch.Tensor:
    """(1 + t) * cond - t * uncond, with the conditional rows first."""
    B = logits_2BlV.shape[0] // 2
    t = torch.as_tensor(t, dtype=logits_2BlV.dtype)
    return (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]


def nucleus_keep(sorted_BlK: torch.Tensor, top_k: Scalar, top_p: Scalar) -> torch.Tensor:
    """Which of the logits sorted in descending order survive top-k, then top-p (official semantics).

    Top-k keeps every logit >= the k-th (ties kept; 0 = off). Top-p then drops the least likely
    tokens whose probabilities sum to at most 1 - top_p, summing from the least likely up; the
    most likely token always survives (0 = off).
    """
    K = sorted_BlK.shape[-1]
    top_k = torch.as_tensor(top_k, dtype=torch.int64).reshape(1)
    k_eff = torch.where((top_k > 0) & (top_k < K), top_k, torch.full_like(top_k, K))
    kth_Bl1 = sorted_BlK.gather(-1, (k_eff - 1).expand(*sorted_BlK.shape[:-1], 1))
    keep_BlK = sorted_BlK >= kth_Bl1
    probs_BlK = sorted_BlK.masked_fill(~keep_BlK, float("-inf")).softmax(dim=-1)
    mass_from_r = probs_BlK.flip(-1).cumsum(dim=-1).flip(-1)  # mass of this token and all less likely ones
    top_p = torch.as_tensor(top_p, dtype=sorted_BlK.dtype).reshape(1)
    not_first_K = torch.arange(K, device=sorted_BlK.device) > 0
    drop_BlK = (mass_from_r <= 1 - top_p) & (top_p > 0) & not_first_K
    return keep_BlK & ~drop_BlK


def sample_inverse_cdf(logits_BlV: torch.Tensor, u_Bl: torch.Tensor) -> torch.Tensor:
    """Draw one position per row: the first whose cumulative probability reaches u * total.

    ``u_Bl`` holds uniforms in (0, 1]; the chosen position always has non-zero probability.
    """
    cdf_BlV = logits_BlV.float().softmax(dim=-1).cumsum(dim=-1)
    target_Bl1 = u_Bl.unsqueeze(-1).float() * cdf_BlV[..., -1:]
    idx_Bl = (cdf_BlV < target_Bl1).sum(dim=-1)
    return idx_Bl.clamp_max(logits_BlV.shape[-1] - 1)


def guided_logits(logits_2BlV: torch.Tensor, cfg_t: Scalar, temperature: Scalar) -> torch.Tensor:
    """What the sampler draws from: CFG-mixed logits divided by the temperature, (B, l, V) fp32."""
    return mix_cfg(logits_2BlV.float(), cfg_t) / torch.as_tensor(temperature, dtype=torch.float32)


def sample_tokens(logits_2BlV: torch.Tensor, u_Bl: torch.Tensor, *, cfg_t: Scalar, temperature: Scalar,
                  top_k: Scalar, top_p: Scalar, candidates: int | None = None) -> torch.Tensor:
    """CFG mix, temperature, top-k/top-p, inverse-CDF sample: (2B, l, V) logits -> (B, l) tokens.

    Only the ``candidates`` most likely tokens are considered (default: ``candidate_count``); an
    exported graph fixes that number and takes ``top_k <= candidates`` as an input. Tokens are
    drawn in the order of decreasing probability, which has the same distribution as drawing in
    vocabulary order and needs one sort for both filters.
    """
    sorted_BlK, idx_BlK, keep_BlK = _filtered(guided_logits(logits_2BlV, cfg_t, temperature), top_k, top_p, candidates)
    pos_Bl = sample_inverse_cdf(sorted_BlK.masked_fill(~keep_BlK, float("-inf")), u_Bl)
    return idx_BlK.gather(-1, pos_Bl.unsqueeze(-1)).squeeze(-1)


def _filtered(logits_BlV: torch.Tensor, top_k: Scalar, top_p: Scalar,
              candidates: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidates sorted (logits, vocabulary indices) and which of them top-k / top-p keep."""
    if candidates is None:
        candidates = candidate_count(int(top_k), logits_BlV.shape[-1])
    sorted_BlK, idx_BlK = logits_BlV.topk(candidates, dim=-1)
    return sorted_BlK, idx_BlK, nucleus_keep(sorted_BlK, top_k, top_p)


def flip_margins(logits_2BlV: torch.Tensor, u_Bl: torch.Tensor, idx_Bl: torch.Tensor, other_Bl: torch.Tensor, *,
                 cfg_t: Scalar, temperature: Scalar, top_k: Scalar, top_p: Scalar,
                 candidates: int | None = None) -> torch.Tensor:
    """How close each token drawn with :func:`sample_tokens` was to being ``other`` instead, (B, l).

    The draw takes the first token whose cumulative probability, in order of decreasing logit,
    reaches u; it turns into ``other`` when the two swap places in that order or when the CDF
    boundary between them passes u. The margin is the smaller of the two distances, as a change
    of the guided logits: half the logit gap between the two tokens, and half the log-odds
    distance between the boundary and u (moving the logits before it by -d and after it by +d
    moves its log-odds by 2d). 0 where the tokens are equal; inf for a token top-k / top-p drop.
    """
    logits_BlV = guided_logits(logits_2BlV, cfg_t, temperature)
    sorted_BlK, idx_BlK, keep_BlK = _filtered(logits_BlV, top_k, top_p, candidates)
    cdf_BlK = sorted_BlK.masked_fill(~keep_BlK, float("-inf")).double().softmax(dim=-1).cumsum(dim=-1)
    K = keep_BlK.shape[-1]

    def rank(tok_Bl: torch.Tensor) -> torch.Tensor:
        hit_BlK = (idx_BlK == tok_Bl.unsqueeze(-1)) & keep_BlK
        return torch.where(hit_BlK.any(-1), hit_BlK.double().argmax(-1), K)

    r_Bl = torch.minimum(rank(idx_Bl), rank(other_Bl))
    edge_Bl = cdf_BlK.gather(-1, r_Bl.clamp_max(K - 1).unsqueeze(-1)).squeeze(-1)
    odds = lambda p: torch.logit(p.clamp(1e-12, 1 - 1e-12))  # noqa: E731
    boundary_Bl = 0.5 * (odds(edge_Bl) - odds(u_Bl.double())).abs()
    gap_Bl = 0.5 * (logits_BlV.gather(-1, idx_Bl.unsqueeze(-1)) - logits_BlV.gather(-1, other_Bl.unsqueeze(-1)))
    margin_Bl = torch.minimum(boundary_Bl, gap_Bl.squeeze(-1).abs().double())
    margin_Bl = torch.where(torch.maximum(rank(idx_Bl), rank(other_Bl)) >= K, torch.inf, margin_Bl)
    return torch.where(idx_Bl == other_Bl, 0.0, margin_Bl)
