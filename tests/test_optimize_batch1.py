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


def test_authors_ab_loads_the_old_package_beside_this_one(tmp_path, reference):
    speed = benchmark_script("speed")
    convert = speed.authors_package("acdbd44", tmp_path)
    assert convert.__name__ == "veloxseg_at_acdbd44e.convert" and convert.VeloxSeg is not veloxseg.VeloxSeg
    assert convert.__file__.startswith(str(tmp_path))
    weights, config, x = speed.reference_run()
    authors = convert.load_reference(weights, config).eval()
    ours = veloxseg.load_reference(weights, config).eval()
    with torch.inference_mode():
        errors = speed.relative_errors(ours(x[:1]), authors(x[:1]))
    assert max(errors) < 1e-5


def test_authors_ab_times_every_run_once_a_round_in_turn():
    speed = benchmark_script("speed")
    calls = []
    times = speed.interleaved_cpu_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 4  # one untimed round first
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3}


def test_fused_jlc_branch_on_level_one_shapes_keeps_the_eager_output():
    """veloxseg_small's level-1 conv branch (16 channels in groups of 4 at 24^3) through the CPU kernel, whose
    GELU computes erf with at::vec's exp_u20: relative L2 error to the eager branch far below 1e-5."""
    from veloxseg.layers import JLCBlock
    from veloxseg.layers.cpu_kernels import load_cpu_kernels

    load_cpu_kernels()
    torch.manual_seed(0)
    block = JLCBlock(16, 4).eval()
    for conv in block.spatial_convs:
        torch.nn.init.normal_(conv.bias, std=0.3)
    x = torch.randn(1, 16, 24, 24, 24)
    with torch.inference_mode():
        expected = block(x)
        block.fused_kernel = True
        got = block(x)
    assert (torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected)).item() < 1e-6
