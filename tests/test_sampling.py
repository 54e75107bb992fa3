"""Inverse-CDF sampling from supplied uniforms, and the official top-k / top-p filtering."""

import numpy as np
import pytest
import torch
from ecm.runtime import draw_uniforms

from ecm.model.sampler import nucleus_keep, sample_inverse_cdf, sample_tokens


def official_filter(logits_BlV, top_k=0, top_p=0.0):
    """The official VAR top-k / top-p filter over the whole vocabulary, as a reference."""
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth = logits_BlV.topk(top_k, dim=-1).values[..., -1:]
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        logits_BlV = logits_BlV.masked_fill(remove_sorted.scatter(-1, sorted_idx, remove_sorted), float("-inf"))
    return logits_BlV


def kept_tokens(logits_BlV, top_k, top_p):
    """Boolean (B, l, V): the tokens our sorted-candidate filter keeps, in vocabulary order."""
    sorted_BlK, idx_BlK = logits_BlV.sort(dim=-1, descending=True)
    keep = nucleus_keep(sorted_BlK, top_k, top_p)
    return torch.zeros_like(keep).scatter(-1, idx_BlK, keep)


def test_inverse_cdf_follows_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    n = 20000
    u = torch.from_numpy(draw_uniforms(0, 1, (int(n**0.5) + 1,))[0][:, :n])
    idx = sample_inverse_cdf(probs.log().expand(1, u.shape[1], 4), u)
    freq = torch.bincount(idx.flatten(), minlength=4).float() / idx.numel()
    assert freq[1] == 0
    assert torch.allclose(freq, probs, atol=0.015)


@pytest.mark.parametrize("u", [1e-30, 1e-8, 0.5, 1 - 1e-7, 1.0])
def test_masked_tokens_are_never_drawn(u):
    logits = torch.full((1, 1, 8), float("-inf"))
    logits[..., 3] = 0.0
    logits[..., 5] = 1.0
    assert sample_inverse_cdf(logits, torch.tensor([[u]])).item() in (3, 5)


def test_top_k_keeps_k_and_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[[0.05, 0.4, 0.1, 0.3, 0.15]]]))
    assert kept_tokens(logits, 2, 0.0).flatten().tolist() == [False, True, False, True, False]
    # 0.4 + 0.3 + 0.15 >= 0.8
    assert kept_tokens(logits, 0, 0.8).flatten().tolist() == [False, True, False, True, True]
    # the best token always survives
    assert kept_tokens(logits, 0, 1e-6).flatten().tolist() == [False, True, False, False, False]


@pytest.mark.parametrize("top_k", [0, 1, 2, 7, 50, 64])
@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.9, 0.96, 1.0])
def test_filter_matches_the_official_one(top_k, top_p):
    logits = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(top_k)) * 3
    want = torch.isfinite(official_filter(logits, top_k, top_p))
    assert torch.equal(kept_tokens(logits, top_k, top_p), want)
    assert torch.equal(kept_tokens(logits, torch.tensor([top_k]), torch.tensor([top_p])), want)


def test_sampled_tokens_follow_the_filtered_distribution():
    logits = torch.tensor([1.0, 3.0, 0.5, 2.0, -1.0, 2.5]).log_softmax(-1)
    logits_2BlV = logits.expand(2, 4000, 6).contiguous()
    u = torch.from_numpy(draw_uniforms(1, 1, (64,))[0][:, :4000])
    idx = sample_tokens(logits_2BlV, u, cfg_t=0.0, temperature=1.0, top_k=3, top_p=0.0)
    want = torch.isfinite(official_filter(logits, 3)) * logits.exp()
    freq = torch.bincount(idx.flatten(), minlength=6).float() / idx.numel()
    assert torch.allclose(freq, want / want.sum(), atol=0.02)


def test_uniforms_are_in_the_half_open_unit_interval_and_seeded():
    a = draw_uniforms(3, 2, (1, 2, 3))
    b = draw_uniforms(3, 2, (1, 2, 3))
    assert [x.shape for x in a] == [(2, 1), (2, 4), (2, 9)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all((x > 0).all() and (x <= 1).all() and x.dtype == np.float32 for x in a)


def test_an_image_depends_on_its_seed_only():
    batch = draw_uniforms(3, 4, (1, 2, 3))
    alone = draw_uniforms(5, 1, (1, 2, 3))
    assert all(np.array_equal(b[2], a[0]) for b, a in zip(batch, alone))
