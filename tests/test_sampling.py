"""Inverse-CDF sampling from supplied uniforms, and the official top-k / top-p filtering."""

import numpy as np
import pytest
import torch
from ecm.runtime import draw_uniforms

from ecm.sampling import filter_top_k_top_p, sample_inverse_cdf


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
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=2))
    assert kept.flatten().tolist() == [False, True, False, True, False]
    kept = torch.isfinite(filter_top_k_top_p(logits, top_p=0.8))  # 0.4 + 0.3 + 0.15 >= 0.8
    assert kept.flatten().tolist() == [False, True, False, True, True]
    kept = torch.isfinite(filter_top_k_top_p(logits, top_p=1e-6))  # the best token always survives
    assert kept.flatten().tolist() == [False, True, False, False, False]


def test_uniforms_are_in_the_half_open_unit_interval_and_seeded():
    a = draw_uniforms(3, 2, (1, 2, 3))
    b = draw_uniforms(3, 2, (1, 2, 3))
    assert [x.shape for x in a] == [(2, 1), (2, 4), (2, 9)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all((x > 0).all() and (x <= 1).all() and x.dtype == np.float32 for x in a)
