"""The CPU kernels that veloxseg.optimize builds (veloxseg/csrc)."""

import pytest
import torch

from veloxseg.layers import PairedWindowAttention, window_scales
from veloxseg.layers.cpu_kernels import SOURCES, load_cpu_kernels
from veloxseg.layers.detail import _DetailLogits, detail_logits
from veloxseg.layers.norm import _NormGelu, gelu_instance_norm, instance_norm
from veloxseg.layers.pixel_shuffle import pixel_shuffle_3d
from veloxseg.layers.pwa import window_attention


@pytest.fixture(scope="module")
def kernel():
    load_cpu_kernels()
    return torch.ops.veloxseg.window_attention


def window_views(windows, heads, length, width, value_width):
    """q, k, v as the model passes them: strided views of one (N, T, 2hc + hcv) window buffer."""
    buffer = torch.randn(windows, length, heads * (2 * width + value_width))
    q, k, v = buffer.split([heads * width, heads * width, heads * value_width], -1)
    return [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]


@pytest.mark.parametrize(
    "windows, heads, length, width, value_width",
    [(7, 1, 54, 4, 4), (3, 2, 100, 8, 8), (2, 2, 27, 8, 16), (1, 4, 54, 16, 32), (2, 3, 17, 6, 10), (1, 1, 1, 4, 4)],
)
def test_kernel_is_softmax_attention(kernel, windows, heads, length, width, value_width):
    """Every compiled width pair and the generic path, lengths off the SIMD width, strided inputs."""
    torch.manual_seed(0)
    q, k, v = window_views(windows, heads, length, width, value_width)
    bias = 3 * torch.randn(heads, length, length)
    expected = window_attention(q, k, v, bias)
    torch.testing.assert_close(kernel(q, k, v, bias, width**-0.5), expected, rtol=1e-5, atol=1e-5)
    keys_major = bias.transpose(1, 2).contiguous().transpose(1, 2)  # the layout the model passes
    torch.testing.assert_close(kernel(q, k, v, keys_major, width**-0.5), expected, rtol=1e-5, atol=1e-5)


def test_kernel_rejects_what_it_cannot_compute(kernel):
    q, k, v = window_views(2, 1, 10, 4, 4)
    bias = torch.zeros(1, 10, 10)
    with pytest.raises(RuntimeError, match="float32"):
        kernel(q.double(), k.double(), v.double(), bias.double(), 0.5)
    with pytest.raises(RuntimeError, match="bias must be"):
        kernel(q, k, v, torch.zeros(1, 10, 9), 0.5)
    with pytest.raises(RuntimeError, match="q and k"):
        kernel(q, k[:1], v, bias, 0.5)


def test_paired_window_attention_with_the_kernel_is_unchanged(kernel):
    """Two modality groups, four window scales (veloxseg_small's level 1 on a smaller grid)."""
    torch.manual_seed(0)
    attention = PairedWindowAttention(16, 2, window_scales((12, 12, 12), (3, 3, 3), (1, 1, 1)), 1, 4).eval()
    torch.nn.init.normal_(attention.relative_position_bias_table, std=1.0)
    xs = [torch.randn(1, 12, 12, 12, 16) for _ in range(2)]
    with torch.inference_mode():
        expected = attention(xs)
        attention.fused_kernel = True
        got = attention(xs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kernel_sizes, shape", [((1, 3, 5), (2, 16, 6, 5, 8)), ((3, 5), (1, 8, 4, 4, 6)), ((1, 3), (1, 16, 3, 3, 34))]
)
def test_folded_jlc_branch_is_the_plain_block(kernel, kernel_sizes, shape):
    """The fused conv branch (folded convs, norms, GELU, sum, un-fold) leaves the block's output unchanged;
    odd widths, a single kernel size and training keep the Python path."""
    from veloxseg.layers import JLCBlock

    torch.manual_seed(0)
    block = JLCBlock(shape[1], shape[1] // 4, kernel_sizes).eval()
    for conv in block.spatial_convs:
        torch.nn.init.normal_(conv.bias, std=0.5)
    x = 2 + torch.randn(shape)  # an offset: the norms' mean matters
    with torch.inference_mode():
        expected = block(x)
        block.fused_kernel = True
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_folded_jlc_branch_rejects_what_it_cannot_compute(kernel):
    weight = torch.zeros(32, 8, 3, 3, 3)
    with pytest.raises(RuntimeError, match="width must be even"):
        torch.ops.veloxseg.jlc_folded_branch(torch.zeros(1, 16, 4, 4, 5), [weight], [torch.zeros(32)], 4)
    with pytest.raises(RuntimeError, match="not a folded conv weight"):
        torch.ops.veloxseg.jlc_folded_branch(torch.zeros(1, 16, 4, 4, 4), [weight[:16]], [torch.zeros(16)], 4)


def reference_detail_logits(x, weight, bias, coarse):
    """The detail path's output step as PyTorch ops: 1x1x1 conv, coarse logits added per 2^3 block, shuffle."""
    return pixel_shuffle_3d(torch.nn.functional.conv3d(x, weight, bias) + coarse.repeat_interleave(8, 1), 2)


def detail_inputs(batch, in_ch, classes, shape, dtype):
    x, coarse = torch.randn(batch, in_ch, *shape, dtype=dtype), torch.randn(batch, classes, *shape, dtype=dtype)
    weight, bias = torch.randn(8 * classes, in_ch, 1, 1, 1, dtype=dtype), torch.randn(8 * classes, dtype=dtype)
    return [t.requires_grad_() for t in (x, weight, bias, coarse)]


@pytest.mark.parametrize("in_ch, classes, shape", [(3, 2, (2, 10, 5)), (1, 1, (1, 1, 17)), (2, 3, (3, 2, 2))])
def test_detail_logits_gradcheck(kernel, in_ch, classes, shape):
    """float64 gradients of the kernel pair against finite differences: rows longer than a task's block
    (H 10), widths off the SIMD width."""
    torch.manual_seed(0)
    assert torch.autograd.gradcheck(_DetailLogits.apply, detail_inputs(2, in_ch, classes, shape, torch.float64))


def test_detail_logits_matches_the_reference_path_on_real_shapes(kernel):
    """veloxseg_small_hr's shapes at 2 x 64^3 in float32: output and every gradient as the PyTorch ops give
    them in float64 (the weight gradient sums 65,536 products: float32 PyTorch is off by 1.6e-6 of its
    largest value there, the kernel by 1.5e-7)."""
    torch.manual_seed(0)
    inputs = detail_inputs(2, 8, 3, (32, 32, 32), torch.float32)
    grad = torch.randn(2, 3, 64, 64, 64)
    out = detail_logits(*inputs)
    assert out.grad_fn.name() == "_DetailLogitsBackward"  # the kernel ran
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    expected = reference_detail_logits(*inputs64)
    actual = [out, *torch.autograd.grad(out, inputs, grad)]
    wanted = [expected, *torch.autograd.grad(expected, inputs64, grad.double())]
    for got, want in zip(actual, wanted):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-3)


def test_detail_logits_without_autograd_is_the_reference_path(kernel):
    """Eval and inference keep the PyTorch ops: outputs independent of whether the kernels are built."""
    inputs = [t.detach() for t in detail_inputs(1, 8, 2, (4, 6, 8), torch.float32)]
    with torch.no_grad():
        assert torch.equal(detail_logits(*inputs), reference_detail_logits(*inputs))


def test_detail_logits_falls_back_without_the_kernels(monkeypatch):
    """Kernels that could not be built: training takes the PyTorch ops (their autograd graph)."""
    import veloxseg.layers.detail

    monkeypatch.setattr(veloxseg.layers.detail, "cpu_kernels_available", lambda: False)
    inputs = detail_inputs(1, 2, 2, (2, 2, 4), torch.float32)
    out = detail_logits(*inputs)
    assert out.grad_fn.name() != "_DetailLogitsBackward"
    assert torch.equal(out, reference_detail_logits(*inputs))


def test_detail_logits_rejects_what_it_cannot_compute(kernel):
    x, coarse = torch.zeros(1, 8, 2, 2, 2), torch.zeros(1, 3, 2, 2, 2)
    with pytest.raises(RuntimeError, match="weight must be a contiguous \\(8 C, K\\) matrix"):
        torch.ops.veloxseg.detail_logits(x, torch.zeros(20, 8), torch.zeros(20), coarse)
    with pytest.raises(RuntimeError, match="coarse must be"):
        torch.ops.veloxseg.detail_logits(x, torch.zeros(24, 8), torch.zeros(24), coarse[:, :2])
    with pytest.raises(RuntimeError, match="grad must be"):
        torch.ops.veloxseg.detail_logits_backward(torch.zeros(1, 3, 4, 4, 2), x, torch.zeros(24, 8))


@pytest.mark.parametrize("shape", [(2, 3, 3, 5, 7), (1, 1, 1, 1, 2), (1, 2, 4, 4, 4)])
def test_norm_gelu_gradcheck(kernel, shape):
    """float64 gradients against finite differences; rows off the SIMD width, an offset and a scale."""
    torch.manual_seed(0)
    x = (3 + 2 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _NormGelu.apply(t, 1e-5), [x])


@pytest.mark.parametrize("shape", [(2, 8, 32, 32, 32), (2, 16, 16, 16, 16), (2, 64, 4, 4, 4)])
def test_norm_gelu_matches_the_reference_path_on_real_shapes(kernel, shape):
    """veloxseg_small_hr's shapes (detail path, JLC levels 1 and 4) in float32 against float64 PyTorch ops."""
    torch.manual_seed(0)
    x, grad = (1 + torch.randn(shape)).requires_grad_(), torch.randn(shape)
    out = gelu_instance_norm(x)
    assert out.grad_fn.name() == "_NormGeluBackward"  # the kernel ran
    x64 = x.detach().double().requires_grad_()
    expected = torch.nn.functional.gelu(instance_norm(x64))
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    (got,), (want,) = torch.autograd.grad(out, x, grad), torch.autograd.grad(expected, x64, grad.double())
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_norm_gelu_without_autograd_is_the_reference_path(kernel):
    x = torch.randn(1, 4, 4, 6, 8)
    with torch.no_grad():
        assert torch.equal(gelu_instance_norm(x.requires_grad_()), torch.nn.functional.gelu(instance_norm(x)))


def test_norm_gelu_rejects_what_it_cannot_compute(kernel):
    with pytest.raises(RuntimeError, match="contiguous \\(B, C, N\\) tensor with N > 0"):
        torch.ops.veloxseg.norm_gelu(torch.zeros(2, 3, 0), 1e-5)
    x = torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="one value per"):
        torch.ops.veloxseg.norm_gelu_backward(x, x, torch.zeros(3), torch.zeros(3))


def test_a_failed_build_names_the_kernels_and_what_they_need(monkeypatch):
    """No compiler (or no ninja): a RuntimeError that says what could not be built and why."""
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise OSError("c++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    sources = ", ".join(source.name for source in SOURCES)  # every file in csrc/
    assert "detail_logits.cpp, dice_ce.cpp" in sources
    message = rf"CPU kernels \({sources}.*C\+\+ compiler.*not found"
    with pytest.raises(RuntimeError, match=message):
        load_cpu_kernels.__wrapped__()  # past the cache: the real build may already have run in this process
