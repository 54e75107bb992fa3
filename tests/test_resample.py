import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ecm.runtime.scales import PATCH_NUMS_256
from hypothesis import given, settings
from hypothesis import strategies as st

from ecm.model import interpolate as resample


@pytest.mark.parametrize("pn", (*PATCH_NUMS_256, 7, 11))
def test_area_and_bicubic_equal_interpolate(pn):
    g = torch.Generator().manual_seed(pn)
    x = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    ref = F.interpolate(x, size=(pn, pn), mode="area")
    assert (resample.area(x, pn) - ref).abs().max() < 1e-12
    y = torch.randn(2, 4, pn, pn, generator=g, dtype=torch.float64)
    ref = F.interpolate(y, size=(16, 16), mode="bicubic", align_corners=False)
    assert (resample.bicubic(y, 16) - ref).abs().max() < 1e-12


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24))
def test_matrices_match_interpolate_for_any_sizes(src, dst):
    x = torch.from_numpy(np.random.default_rng(src * 31 + dst).standard_normal((1, 1, src, src)))
    assert (resample.area(x, dst) - F.interpolate(x, size=(dst, dst), mode="area")).abs().max() < 1e-12
    ref = F.interpolate(x, size=(dst, dst), mode="bicubic", align_corners=False)
    assert (resample.bicubic(x, dst) - ref).abs().max() < 1e-12


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 32), st.integers(1, 32))
def test_resampling_rows_preserve_constants(src, dst):
    # Both kernels are partitions of unity: a constant image stays constant.
    assert np.allclose(resample.bicubic_matrix(src, dst).sum(1), 1)
    assert np.allclose(resample.area_matrix(src, dst).sum(1), 1)
