"""The detail path's channels-last training path: the 8-channel 3^3 conv kernel (csrc/conv3x3_channels_last.cpp),
the channels-last norm + GELU kernel (csrc/norm_gelu_channels_last.cpp) and the mix as matrix products, against
finite differences and the PyTorch path."""

import pytest
import torch
import torch.nn.functional as F

import veloxseg.layers.detail as detail
import veloxseg.layers.norm as norm
from veloxseg.layers.conv import conv3x3_channels_last
from veloxseg.layers.cpu_kernels import load_cpu_kernels
from veloxseg.layers.detail import DetailPath, DetailStem
from veloxseg.layers.norm import gelu_instance_norm, instance_norm

CHANNELS_LAST = torch.channels_last_3d


@pytest.fixture(scope="module")
def kernels():
    load_cpu_kernels()


def channels_last(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype).contiguous(memory_format=CHANNELS_LAST).requires_grad_()


@pytest.mark.parametrize("shape", [(1, 8, 3, 4, 5), (2, 8, 1, 2, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv3x3_gradcheck(kernels, shape, bias):
    """float64 gradients in x, weight and bias against finite differences; rows shorter than the kernel's
    blocks of voxels, a single plane, no bias."""
    torch.manual_seed(0)
    x = channels_last(*shape)
    weight = torch.randn(8, 8, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(conv3x3_channels_last, [x, weight, b])


def test_conv3x3_matches_pytorch_on_real_shapes(kernels):
    """The detail path's 2 x 8 x 32^3 in float32: output and gradients as float64 PyTorch gives them, whatever
    x's layout."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32, 32, 32)
    weight, bias = 0.1 * torch.randn(8, 8, 3, 3, 3), torch.randn(8)
    grad = torch.randn(2, 8, 32, 32, 32)
    reference = [t.double().requires_grad_() for t in (x, weight, bias)]
    expected_out = F.conv3d(*reference, padding=1)
    expected = torch.autograd.grad(expected_out, reference, grad.double())
    for layout in (torch.contiguous_format, CHANNELS_LAST):
        inputs = [x.contiguous(memory_format=layout).requires_grad_(), weight.requires_grad_(), bias.requires_grad_()]
        out = conv3x3_channels_last(*inputs)
        assert out.is_contiguous(memory_format=CHANNELS_LAST)
        torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)
        for got, want in zip(torch.autograd.grad(out, inputs, grad), expected):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3 * want.abs().max().item())


def test_conv3x3_rejects_what_it_cannot_compute(kernels):
    with pytest.raises(ValueError, match="weight \\(8, 8, 3, 3, 3\\)"):
        conv3x3_channels_last(torch.randn(1, 8, 4, 4, 4), torch.randn(8, 8, 1, 1, 1), None)
    with pytest.raises(ValueError, match="x \\(B, 8, D, H, W\\)"):
        conv3x3_channels_last(torch.randn(1, 4, 4, 4, 4), torch.randn(8, 8, 3, 3, 3), None)
    with pytest.raises(RuntimeError, match="contiguous \\(B, D, H, W, 8\\)"):
        torch.ops.veloxseg.conv3x3_channels_last(torch.randn(1, 8, 4, 4, 4), torch.randn(27, 8, 8), None)
    with pytest.raises(RuntimeError, match="\\(27, 8, 8\\)"):
        torch.ops.veloxseg.conv3x3_channels_last(torch.randn(1, 4, 4, 4, 8), torch.randn(8, 8, 27), None)


@pytest.mark.parametrize("shape", [(2, 3, 3, 2, 5), (1, 8, 2, 3, 3), (1, 24, 2, 2, 1)])
def test_norm_gelu_channels_last_gradcheck(kernels, shape):
    """float64 gradients against finite differences; channel counts below, at and above the SIMD width, voxel
    counts that end in a partial run."""
    torch.manual_seed(0)
    x = channels_last(*shape)
    assert torch.autograd.gradcheck(gelu_instance_norm, [x])


@pytest.mark.parametrize("shape", [(2, 8, 32, 32, 32), (2, 3, 17, 9, 5)])
def test_norm_gelu_channels_last_matches_pytorch(kernels, shape):
    """float32 channels-last x, values far from zero: output (channels-last) and gradient as float64
    PyTorch ops give them."""
    torch.manual_seed(0)
    x = (3 * torch.randn(shape) + 5).contiguous(memory_format=CHANNELS_LAST).requires_grad_()
    grad = torch.randn(shape)
    reference = x.detach().double().requires_grad_()
    expected = F.gelu(instance_norm(reference))
    out = gelu_instance_norm(x)
    assert out.is_contiguous(memory_format=CHANNELS_LAST) and out.grad_fn.name() == "_NormGeluChannelsLastBackward"
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=2e-5)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, reference, grad.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5)


def test_norm_gelu_channels_last_rejects_what_it_cannot_compute(kernels):
    with pytest.raises(RuntimeError, match="contiguous \\(B, N, C\\)"):
        torch.ops.veloxseg.norm_gelu_channels_last(torch.randn(2, 4, 3).transpose(1, 2), 1e-5)
    x, mean = torch.randn(2, 5, 3), torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="one value of x's dtype per \\(B, C\\)"):
        torch.ops.veloxseg.norm_gelu_channels_last_backward(x, x, torch.zeros(2, 2), mean)


@pytest.mark.parametrize("shape", [(1, 1, 4, 6, 2), (2, 2, 2, 4, 36)])
def test_stem_gradcheck(kernels, shape):
    """float64 gradients in the weight and bias against finite differences; several input channels, rows longer
    than a SIMD vector and not a multiple of it."""
    torch.manual_seed(0)
    stem = DetailStem(shape[1], 8).double().train()
    x = torch.randn(shape, dtype=torch.float64)
    assert stem(x).grad_fn.name() == "_StemConvBackward"
    assert torch.autograd.gradcheck(lambda w, b: detail._StemConv.apply(x, w, b), [stem.weight, stem.bias])


def test_stem_matches_pytorch_on_real_shapes(kernels):
    """2 x 1 x 64^3 in float32: output and weight and bias gradients as float64 PyTorch gives them."""
    torch.manual_seed(0)
    stem = DetailStem(1, 8).train()
    x, grad = torch.randn(2, 1, 64, 64, 64), torch.randn(2, 8, 32, 32, 32)
    out = stem(x)
    assert out.grad_fn.name() == "_StemConvBackward"
    weight, bias = (t.detach().double().requires_grad_() for t in (stem.weight, stem.bias))
    expected = F.conv3d(x.double(), weight, bias, stride=2, padding=1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    got = torch.autograd.grad(out, [stem.weight, stem.bias], grad)
    for g, e in zip(got, torch.autograd.grad(expected, [weight, bias], grad.double())):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


def test_stem_keeps_onednn_where_the_kernel_does_not_apply(kernels):
    """An input that wants a gradient, odd sizes, eval: oneDNN's conv (the same function)."""
    stem = DetailStem(1, 8).train()
    for x in (torch.randn(1, 1, 4, 4, 4, requires_grad=True), torch.randn(1, 1, 4, 5, 4)):
        out = stem(x)
        assert out.grad_fn is None or out.grad_fn.name() != "_StemConvBackward"
        torch.testing.assert_close(out, F.conv3d(x, stem.weight, stem.bias, stride=2, padding=1), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(stem(torch.ones(1, 1, 4, 4, 4)), super(DetailStem, stem).forward(torch.ones(1, 1, 4, 4, 4)))


def test_stem_kernel_rejects_what_it_cannot_compute(kernels):
    with pytest.raises(RuntimeError, match="phases must be"):
        torch.ops.veloxseg.stem_conv(torch.randn(1, 1, 3, 4, 2, 4), torch.randn(8, 1, 4, 4, 4), torch.randn(8))
    with pytest.raises(RuntimeError, match="weight must be a contiguous \\(8, C, 4, 4, 4\\)"):
        torch.ops.veloxseg.stem_conv(torch.randn(1, 2, 4, 4, 2, 4), torch.randn(8, 1, 4, 4, 4), torch.randn(8))


def small_path(width: int, dtype: torch.dtype) -> tuple[DetailPath, list[torch.Tensor]]:
    """A detail path with a non-zero output conv and its inputs: stem output, u_1, coarse logits."""
    torch.manual_seed(0)
    path = DetailPath(1, 4, width, 2).to(dtype).train()
    torch.nn.init.normal_(path.out.weight, std=0.3)
    stem = torch.randn(2, width, 4, 6, 2, dtype=dtype, requires_grad=True)
    u1 = torch.randn(2, 4, 2, 3, 1, dtype=dtype, requires_grad=True)
    coarse = torch.randn(2, 2, 4, 6, 2, dtype=dtype, requires_grad=True)
    return path, [stem, u1, coarse]


@pytest.mark.parametrize("width", [8, 4])
def test_detail_path_training_gradcheck(kernels, width):
    """The whole channels-last training path in float64 against finite differences: with the 8-channel conv
    kernel, and (4 channels) with oneDNN's conv."""
    path, inputs = small_path(width, torch.float64)
    assert detail._fast_training(inputs[0])
    assert torch.autograd.gradcheck(lambda *xs: path(*xs), inputs)


def path_grads(path: DetailPath, inputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    out = path(path.stem(inputs[0]), *inputs[1:])
    return [out, *torch.autograd.grad(out, [*inputs[1:], *path.parameters()], grad)]


def test_detail_path_training_matches_the_pytorch_path_on_real_shapes(kernels, monkeypatch):
    """veloxseg_small_hr's path at 2 x 64^3 in float32: the output and the gradients in u_1, the coarse logits and
    every parameter are within 4x float32 PyTorch's distance to float64 PyTorch's, or 1e-5 of their largest
    value (the biases before an instance norm have zero gradient up to rounding)."""
    torch.manual_seed(0)
    path = DetailPath(1, 16, 8, 3).train()
    torch.nn.init.normal_(path.out.weight, std=0.3)
    inputs = [torch.randn(2, 1, 64, 64, 64), torch.randn(2, 16, 16, 16, 16, requires_grad=True),
              torch.randn(2, 3, 32, 32, 32, requires_grad=True)]  # fmt: skip
    grad = torch.randn(2, 3, 64, 64, 64)
    calls = []
    monkeypatch.setattr(detail, "conv3x3_channels_last", lambda *a: calls.append(1) or conv3x3_channels_last(*a))
    got = path_grads(path, inputs, grad)
    assert calls, "the training path did not take the conv kernel"
    monkeypatch.setattr(detail, "cpu_kernels_available", lambda: False)
    monkeypatch.setattr(norm, "cpu_kernels_available", lambda: False)
    plain = path_grads(path, inputs, grad)
    reference = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    expected = path_grads(path.double(), reference, grad.double())
    for g, p, e in zip(got, plain, expected):
        scale = e.abs().max().item()
        assert (g.double() - e).abs().max().item() <= 4 * (p.double() - e).abs().max().item() + 1e-5 * scale


def test_detail_path_eval_is_the_pytorch_path(kernels):
    """Without autograd the path takes the PyTorch ops: the mix's conv, not its matrix products."""
    path, (stem, u1, coarse) = small_path(8, torch.float32)
    with torch.no_grad():
        out = path(stem, u1, coarse)
        expected = detail.detail_logits(
            F.gelu(instance_norm(path.spatial(F.gelu(instance_norm(path.mix(torch.cat([stem, path.up(u1)], 1))))))),
            path.out.weight, path.out.bias, coarse,
        )  # fmt: skip
    assert torch.equal(out, expected)


def test_detail_path_training_rejects_mismatched_sizes(kernels):
    path, (stem, u1, coarse) = small_path(8, torch.float32)
    with pytest.raises(ValueError, match="twice u_1"):
        path(stem, u1[:, :, :1], coarse)


def test_weight_gradients_do_not_depend_on_the_thread_count(kernels):
    """The conv's and the stem's weight gradients sum per-thread partials: 3 threads give 1 thread's values."""
    torch.manual_seed(0)
    x = channels_last(2, 8, 6, 5, 4)
    weight = torch.randn(8, 8, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    image = torch.randn(3, 2, 8, 6, 10, dtype=torch.float64)
    stem_weight = torch.randn(8, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(8, dtype=torch.float64, requires_grad=True)

    def gradients() -> list[torch.Tensor]:
        conv = torch.autograd.grad(conv3x3_channels_last(x, weight, None).square().sum(), weight)
        stem = torch.autograd.grad(detail._StemConv.apply(image, stem_weight, bias).square().sum(), stem_weight)
        return [*conv, *stem]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = gradients()
        torch.set_num_threads(3)
        for got, want in zip(gradients(), single):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(threads)
