"""Issue 34, eval at batch 1: the input check's cost, the authors' A/B of ``benchmarks/speed.py``."""

import pytest
import torch

import veloxseg

from .conftest import SMALL_ROI, benchmark_script


@pytest.fixture(scope="module")
def tiny() -> veloxseg.VeloxSeg:
    return veloxseg.create_model("veloxseg_tiny", **SMALL_ROI).eval()


def test_finite_input_whose_sum_overflows_passes_the_check(tiny):
    x = torch.full((1, 2, 64, 64, 64), 3e38)  # finite voxels, an infinite float32 sum
    assert not torch.isfinite(x.sum())
    tiny.check_finite(x)


@pytest.mark.parametrize("values", [(float("inf"), float("-inf")), (float("nan"), 1.0), (float("inf"), 2.0)])
def test_non_finite_voxels_are_caught_whatever_their_sum(tiny, values):
    x = torch.zeros(1, 2, 64, 64, 64)
    x[0, 0, 1, 2, 3], x[0, 1, 4, 5, 6] = values
    with pytest.raises(ValueError, match="non-finite voxels"):
        tiny.check_finite(x)
