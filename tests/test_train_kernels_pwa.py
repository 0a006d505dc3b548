"""The paired-window attention's training kernels (csrc/pwa_train.cpp): gradients and the PyTorch path."""

import pytest
import torch

import veloxseg.layers.pwa as pwa
from veloxseg.layers import PairedWindowAttention, window_scales
from veloxseg.layers.pwa import WindowScale

# 2^3 tokens per window at every scale: one unpooled, one pooled, one pooled unequally along the axes
SCALES = [WindowScale((2, 2, 2), (1, 1, 1)), WindowScale((4, 4, 4), (2, 2, 2)), WindowScale((4, 4, 8), (2, 2, 4))]
from veloxseg.layers.cpu_kernels import load_cpu_kernels


@pytest.fixture(scope="module")
def kernel():
    load_cpu_kernels()
    return torch.ops.veloxseg.pwa_train


def small_layer(groups: int, heads: int, dtype: torch.dtype) -> PairedWindowAttention:
    """:data:`SCALES` on a 4 x 4 x 8 grid, a non-zero position bias."""
    torch.manual_seed(0)
    layer = PairedWindowAttention(6, groups, SCALES, heads, 2).to(dtype)
    torch.nn.init.normal_(layer.relative_position_bias_table)
    return layer.train()


@pytest.mark.parametrize("groups, heads", [(1, 1), (2, 2), (3, 1)])
def test_pwa_train_gradcheck(kernel, groups, heads):
    """float64 gradients of the kernel pair in the projections and the bias table against finite differences:
    one and several groups and heads, a pooled and an unpooled scale."""
    layer = small_layer(groups, heads, torch.float64)
    projected = torch.randn(groups, 2, 4, 4, 8, layer.qkv[0].out_channels, dtype=torch.float64, requires_grad=True)
    table = layer.relative_position_bias_table
    assert torch.autograd.gradcheck(lambda p, t: pwa._PairedWindows.apply(p, t, layer), [projected, table])


def graph_names(out: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that ``out`` depends on."""
    names, stack, seen = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.add(node.name())
            stack.extend(parent for parent, _ in node.next_functions)
    return names


def run_layer(layer, xs, groups, kernels: bool, monkeypatch):
    """The layer's outputs and the gradients of a fixed random loss in the inputs and every parameter."""
    monkeypatch.setattr(pwa, "cpu_kernels_available", lambda: kernels)
    monkeypatch.setattr(pwa, "TRAIN_KERNEL_MAX_TOKENS", 64)  # level 2's windows too
    outs = layer(xs, groups)
    assert ("_PairedWindowsBackward" in graph_names(outs[0])) == kernels
    torch.manual_seed(1)
    loss = sum((torch.randn_like(out) * out).sum() for out in outs)
    grads = torch.autograd.grad(loss, [*xs, *layer.parameters()], allow_unused=True)
    return [*outs, *(torch.zeros(1) if g is None else g for g in grads)]


@pytest.mark.parametrize("groups", [(0, 1), (1,)])
def test_pwa_layer_gradcheck_on_the_kernel(kernel, groups, monkeypatch):
    """The whole layer (norms, projections, the kernel) against finite differences, a group missing or not."""
    monkeypatch.setattr(pwa, "cpu_kernels_available", lambda: True)
    layer = small_layer(2, 1, torch.float64)
    xs = [torch.randn(1, 4, 4, 8, 6, dtype=torch.float64, requires_grad=True) for _ in groups]
    assert layer._train_kernel(xs[0])
    assert torch.autograd.gradcheck(lambda *xs: tuple(layer(list(xs), groups)), xs)


@pytest.mark.parametrize(
    "dim, grid, min_window, heads, qk",
    [(16, (16, 16, 16), (2, 2, 2), 1, 4), (32, (8, 8, 8), (4, 4, 4), 2, 8), (64, (4, 4, 4), (2, 2, 2), 2, 8),
     (128, (2, 2, 2), (2, 2, 2), 4, 16)],
)  # fmt: skip
def test_pwa_kernel_matches_the_pytorch_path_on_real_shapes(kernel, dim, grid, min_window, heads, qk, monkeypatch):
    """veloxseg_small_hr's four levels at 2 x 64^3 in float32: outputs and every gradient as the PyTorch ops
    give them."""
    torch.manual_seed(0)
    layer = PairedWindowAttention(dim, 1, window_scales(grid, min_window, (1, 1, 1)), heads, qk).train()
    torch.nn.init.normal_(layer.relative_position_bias_table)
    xs = [torch.randn(2, *grid, dim, requires_grad=True)]
    expected = run_layer(layer, xs, [0], False, monkeypatch)
    actual = run_layer(layer, xs, [0], True, monkeypatch)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


def test_pwa_kernel_matches_the_pytorch_path_with_groups_missing(kernel, monkeypatch):
    """Three modality groups, one missing, four scales on a 16 x 16 x 8 grid, float64."""
    torch.manual_seed(0)
    scales = [*SCALES, WindowScale((16, 16, 8), (8, 8, 4))]
    layer = PairedWindowAttention(16, 3, scales, 1, 4).double().train()
    torch.nn.init.normal_(layer.relative_position_bias_table)
    xs = [torch.randn(2, 16, 16, 8, 16, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    expected = run_layer(layer, xs, [0, 2], False, monkeypatch)
    for got, want in zip(run_layer(layer, xs, [0, 2], True, monkeypatch), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_pwa_eval_and_no_grad_keep_the_pytorch_path(kernel):
    """Eval, inference and attention dropout: the PyTorch ops (outputs independent of the kernels)."""
    layer = small_layer(1, 1, torch.float32)
    x = torch.randn(1, 4, 4, 8, 6, requires_grad=True)
    assert layer._train_kernel(x)
    with torch.no_grad():
        assert not layer._train_kernel(x)
    assert not layer.eval()._train_kernel(x)
    assert not PairedWindowAttention(6, 1, layer.scales, 1, 2, attn_drop=0.1).train()._train_kernel(x)


def test_pwa_long_windows_keep_the_pytorch_path(kernel):
    """Windows of 64 tokens (veloxseg_small_hr's level 2), where the PyTorch ops measured faster."""
    layer = PairedWindowAttention(32, 1, window_scales((8, 8, 8), (4, 4, 4), (1, 1, 1)), 2, 8).train()
    assert not layer._train_kernel(torch.randn(1, 8, 8, 8, 32))
    assert small_layer(1, 1, torch.float32)._train_kernel(torch.randn(1, 4, 4, 8, 6))


def test_pwa_train_rejects_what_it_cannot_compute(kernel):
    layer = small_layer(1, 1, torch.float32)
    table = layer.relative_position_bias_table.detach()
    index, resize, windows, pools, *rest = layer.kernel_geometry()
    projected = torch.zeros(1, 2, 4, 4, 8, layer.qkv[0].out_channels)
    with pytest.raises(RuntimeError, match="channels, not scales"):
        kernel(projected[..., 1:].contiguous(), table, index, resize, windows, pools, *rest)
    with pytest.raises(RuntimeError, match="do not tile the grid"):
        kernel(projected[:, :, :, :, :6].contiguous(), table, index, resize, windows, pools, *rest)
    with pytest.raises(RuntimeError, match="windows and pools must be positive"):
        kernel(projected, table, index, resize, windows, [0] * len(pools), *rest)
    with pytest.raises(RuntimeError, match="index out of the table's range"):
        kernel(projected, table, index + 100, resize, windows, pools, *rest)
    with pytest.raises(RuntimeError, match="resize matrix 1"):
        kernel(projected, table, index, [resize[0]] * 3, windows, pools, *rest)
