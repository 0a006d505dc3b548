"""Variants, shapes, training outputs, registry and the errors users see."""

import pytest
import timm
import torch
import torch.nn.functional as F

import veloxseg
from veloxseg.layers import JLCBlock, pixel_shuffle_3d, window_scales
from veloxseg.layers.conv import OneDNNConv3d, PatchConv3d, grouped_conv3d
from veloxseg.layers.pwa import PairedWindowAttention, relative_position_index, window_attention

from .conftest import SMALL_ROI


@pytest.mark.parametrize("name", ["veloxseg_tiny", "veloxseg_small", "veloxseg_base"])
@pytest.mark.parametrize("group_channels", [[1], [1, 1], [1, 2, 1]])
def test_variants_train_and_eval(name, group_channels):
    model = veloxseg.create_model(name, group_channels=group_channels, n_classes=3, **SMALL_ROI)
    x = torch.randn(2, sum(group_channels), 64, 64, 64)
    out = model.train()(x)
    assert isinstance(out, veloxseg.VeloxSegOutput)
    assert [tuple(t.shape) for t in out.logits] == [(2, 3, 64, 64, 64)] * 4
    assert out.reconstruction.shape == x.shape
    c1 = model.config.base_ch
    assert out.gram.shape == (2, c1, c1) and len(out.teacher_grams) == len(group_channels)
    loss = sum(t.square().mean() for t in out.logits) + out.reconstruction.square().mean()
    loss = loss + sum((out.gram - g).square().mean() for g in out.teacher_grams)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient in training: {unused}"
    model.zero_grad()
    logits = model.eval()(x)
    assert logits.shape == (2, 3, 64, 64, 64)
    logits.mean().backward()
    assert all(p.grad is None for p in model.teachers.parameters())


def test_eval_runs_nothing_of_the_teachers():
    model = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI).eval()
    calls = []
    for module in [model.teachers, model.decoder.aux_heads]:
        module.register_forward_pre_hook(lambda *_: calls.append(1))
        for child in module.modules():
            child.register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(torch.randn(1, 2, 64, 64, 64))
    assert calls == []


def test_without_teachers_and_deep_supervision():
    model = veloxseg.create_model("veloxseg_tiny", teachers=False, deep_supervision=False, **SMALL_ROI)
    full = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI)
    assert sum(p.numel() for p in model.parameters()) == model.inference_parameters() == full.inference_parameters()
    out = model.train()(torch.randn(1, 2, 64, 64, 64))
    assert len(out.logits) == 1 and out.reconstruction is None and out.teacher_grams == []


def test_paper_parameter_counts():
    assert veloxseg.create_model("veloxseg_small").inference_parameters() == 1_669_185
    sizes = [veloxseg.create_model(n).inference_parameters() for n in ("veloxseg_tiny", "veloxseg_base")]
    assert 300_000 < sizes[0] < 600_000 and 5_000_000 < sizes[1] < 8_000_000


def test_timm_registry():
    assert set(timm.list_models("veloxseg*")) == {"veloxseg_tiny", "veloxseg_small", "veloxseg_base", "veloxseg_small_hr"}
    assert veloxseg.list_models("*tiny") == ["veloxseg_tiny"]
    model = timm.create_model("veloxseg_tiny", group_channels=[4], n_classes=4, **SMALL_ROI)
    assert isinstance(model, veloxseg.VeloxSeg) and model.config.group_channels == (4,)
    assert model.pretrained_cfg["architecture"] == "veloxseg_tiny"


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ValueError, match="Did you mean veloxseg_small"):
        veloxseg.create_model("veloxseg_smal")
    with pytest.raises(TypeError, match="did you mean 'n_classes'"):
        veloxseg.create_model("veloxseg_tiny", num_class=3)


def test_input_errors_name_the_problem():
    model = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI).eval()
    with pytest.raises(ValueError, match=r"expects 2 input channels \(group_channels=\[1, 1\]\), got 3"):
        model(torch.randn(1, 3, 64, 64, 64))
    with pytest.raises(ValueError, match=r"built for spatial size \[64, 64, 64\].*got \[64, 64, 48\]"):
        model(torch.randn(1, 2, 64, 64, 48))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        model(torch.randn(2, 64, 64, 64))
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.randn(0, 2, 64, 64, 64))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(roi_size=(100, 96, 96)), r"multiple of 32"),
        (dict(roi_size=(64, 64, 64)), r"window \[3, 3, 3\] does not tile the token grid \[16, 16, 16\]"),
        (dict(roi_size=(96, 96, 192)), r"window \[48, 48, 48\] is larger than the token grid \[24, 24, 48\]"),
        (dict(min_dim_group=(5, 8, 8, 16)), r"min_dim_group 5 does not split the 16 conv channels"),
        (dict(depths=(1, 1, 1)), r"depths needs 4 entries"),
        (dict(big_windows=[[3, 3, 3], [6, 6, 6], [3, 3, 3], [3, 3, 3]], small_windows=[[2, 2, 2]] * 4), "not a multiple"),
        (dict(group_channels=[]), r"group_channels must list"),
        (dict(roi_size=(32, 32, 32), big_windows=[[2, 2, 2], [4, 4, 4], [2, 2, 2], [1, 1, 1]]), "single voxel"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        veloxseg.VeloxSegConfig().replace(**overrides)


def test_autopet_window_scales():
    """The paper's scales: level 1 big 3..24 with small 1..8; every scale pools to 3^3 tokens."""
    scales = window_scales((24, 24, 24), (3, 3, 3), (1, 1, 1))
    assert [s.window[0] for s in scales] == [3, 6, 12, 24] and [s.pool[0] for s in scales] == [1, 2, 4, 8]
    cfg = veloxseg.VeloxSegConfig()
    assert [len(cfg.level_scales(level)) for level in range(1, 5)] == [4, 2, 2, 1]
    attn = veloxseg.VeloxSeg(cfg).attention.levels[2][0].attn
    assert (attn.qk_channels, attn.v_channels, attn.v_head_dim) == (32, 64, 16)


def test_pixel_shuffle_3d_layout():
    f = 2
    x = torch.arange(2 * f**3 * 3 * 1 * 2, dtype=torch.float32).view(1, 2 * f**3, 3, 1, 2)
    y = pixel_shuffle_3d(x, f)
    assert y.shape == (1, 2, 6, 2, 4)
    c, d, h, w, s1, s2, s3 = 1, 2, 0, 1, 1, 0, 1
    assert y[0, c, d * f + s1, h * f + s2, w * f + s3] == x[0, c * f**3 + s1 * f**2 + s2 * f + s3, d, h, w]


@pytest.mark.parametrize(
    "dtype, f", [(torch.float32, 4), (torch.float32, 2), (torch.bfloat16, 4), (torch.float64, 2), (torch.float64, 4)]
)
def test_pixel_shuffle_3d_channels_last_input(dtype, f):
    """The head's channels-last output (moved in f-channel chunks where a wide dtype exists) shuffles
    bit for bit like the channels-first layout, NaN payloads included."""
    x = torch.randn(2, 3 * f**3, 3, 2, 5).to(dtype)
    x[0, 5, 1, 1, 2] = float("nan")
    expected = pixel_shuffle_3d(x, f)
    got = pixel_shuffle_3d(x.contiguous(memory_format=torch.channels_last_3d), f)
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("f", [2, 4])
def test_pixel_shuffle_3d_channels_last_gradient(f):
    """In training the chunked shuffle's backward returns the generic permute's gradient exactly."""
    x = torch.randn(2, 3 * f**3, 3, 2, 4)
    grad = torch.randn(2, 3, 3 * f, 2 * f, 4 * f)
    leaf_cf = x.clone().requires_grad_()
    leaf_cl = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    pixel_shuffle_3d(leaf_cf, f).backward(grad)
    pixel_shuffle_3d(leaf_cl, f).backward(grad)
    assert torch.equal(leaf_cl.grad, leaf_cf.grad)


@pytest.mark.parametrize("channels, groups, kernel", [(16, 4, (5, 5, 3)), (32, 4, (3, 3, 3)), (64, 8, (3, 3, 3))])
def test_grouped_conv3d_fast_weight_gradient(channels, groups, kernel):
    """CPU training takes the grouped conv's weight gradient on channels-last copies: the forward is the
    same bit for bit, every gradient matches autograd's through F.conv3d."""
    x = torch.randn(2, channels, 6, 5, 4)
    weight = torch.randn(channels, channels // groups, *kernel) * 0.1
    bias = torch.randn(channels)
    padding = tuple(k // 2 for k in kernel)
    grad = torch.randn(2, channels, 6, 5, 4)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = grouped_conv3d(*leaves, padding, groups)
    assert type(out.grad_fn).__name__.startswith("_FastWeightGradConv3d")
    reference = [t.clone().requires_grad_() for t in (x, weight, bias)]
    expected = F.conv3d(*reference, padding=padding, groups=groups)
    assert torch.equal(out, expected)
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip(leaves, reference):
        assert got.grad.is_contiguous()
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels, groups, kernel", [(8, 2, (1, 1, 1)), (128, 8, (3, 3, 3))])
def test_grouped_conv3d_own_weight_gradient(channels, groups, kernel):
    """1x1x1 kernels and wide convs keep PyTorch's own backward (faster there)."""
    x = torch.randn(2, channels, 4, 4, 4)
    weight = (torch.randn(channels, channels // groups, *kernel) * 0.1).requires_grad_()
    out = grouped_conv3d(x, weight, None, tuple(k // 2 for k in kernel), groups)
    assert type(out.grad_fn).__name__ == "ConvolutionBackward0"


@pytest.mark.parametrize("in_ch, bias, input_grad", [(1, True, False), (2, False, True)])
def test_patch_conv_backward(in_ch, bias, input_grad):
    """The patch embedding's GEMM backward: same forward bit for bit, gradients as autograd's through F.conv3d."""
    embed = PatchConv3d(in_ch, 6, 2)
    if not bias:
        embed.bias = None
    x = torch.randn(2, in_ch, 4, 6, 8).requires_grad_(input_grad)
    out = embed(x)
    assert type(out.grad_fn).__name__.startswith("_PatchConvBackward")
    with torch.no_grad():
        assert torch.equal(out, F.conv3d(x, embed.weight, embed.bias, stride=2))
    grad = torch.randn_like(out)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_(input_grad)
    params = [p.detach().clone().requires_grad_() for p in embed.parameters()]
    F.conv3d(x_ref, params[0], params[1] if bias else None, stride=2).backward(grad)
    for got, want in zip([*embed.parameters(), x], [*params, x_ref]):
        if want.requires_grad:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias, input_grad", [(True, True), (False, False)])
def test_onednn_conv_channels_last_backward(bias, input_grad):
    """``channels_last_backward``: the same forward bit for bit, gradients as autograd's through F.conv3d."""
    conv = OneDNNConv3d(4, 6, 3, padding=1, bias=bias, channels_last_backward=True)
    x = torch.randn(2, 4, 6, 5, 4).requires_grad_(input_grad)
    grad = torch.randn(2, 6, 6, 5, 4)
    out = conv(x)
    assert type(out.grad_fn).__name__.startswith("_ChannelsLastBackwardConv3d")
    with torch.no_grad():
        assert torch.equal(out, conv(x))  # the inference path: the plain oneDNN conv
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_(input_grad)
    params = [p.detach().clone().requires_grad_() for p in conv.parameters()]
    F.conv3d(x_ref, *params, padding=1).backward(grad)
    for got, want in zip([*conv.parameters(), x], [*params, x_ref]):
        if want.requires_grad:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


def test_relative_position_index_formula():
    index = relative_position_index((3, 3, 3))
    # query token (0, 0, 0) vs key token (2, 1, 0): offset (-2, -1, 0)
    assert index[0, 2 * 9 + 1 * 3 + 0] == (-2 + 2) * 25 + (-1 + 2) * 5 + (0 + 2)
    assert index.max() == 124 and torch.all(index.diagonal() == 62)


def test_gram_matrix():
    f = torch.randn(2, 4, 3, 3, 3)
    flat = f.flatten(2)
    expected = torch.einsum("bcn,bdn->bcd", flat, flat) / (4 * 27)
    assert torch.allclose(veloxseg.gram_matrix(f), expected, atol=1e-6)


@pytest.mark.parametrize(
    "windows, heads, length, width, value_width",
    [(585, 1, 54, 4, 4), (3, 2, 432, 8, 8), (9, 2, 54, 8, 16)],  # level 1, level 2 (one window at a time), level 3
)
def test_window_attention_is_softmax_attention(windows, heads, length, width, value_width):
    q, k = torch.randn(2, windows, heads, length, width).unbind(0)
    v, bias = torch.randn(windows, heads, length, value_width), torch.randn(heads, length, length)
    q.requires_grad_()
    expected = torch.softmax(q @ k.transpose(-2, -1) / width**0.5 + bias, -1) @ v
    out = window_attention(q, k, v, bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out.square().sum(), q)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), q)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [(0, 1), (1,)])
def test_paired_window_attention_gradcheck(groups):
    """The attention's backward (the gather's and scatter's per-scale splits, max pools and resizes) matches
    finite differences in float64, with both modality groups and with one missing."""
    torch.manual_seed(0)
    scales = window_scales((4, 4, 4), (2, 2, 2), (1, 1, 1))
    attn = PairedWindowAttention(4, 2, scales, num_heads=1, qk_head_dim=2).double()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    xs = [torch.randn(1, 4, 4, 4, 4, dtype=torch.float64, requires_grad=True) for _ in groups]
    assert torch.autograd.gradcheck(lambda *xs: tuple(attn(list(xs), groups)), xs)


@pytest.mark.parametrize("kernel_sizes", [(1, 3, 5), (3,), (5, 7)])
def test_folded_jlc_block_is_the_plain_one(kernel_sizes):
    """Narrow groups run on the width-folded input: same outputs and gradients as the plain convs."""
    torch.manual_seed(0)
    block = JLCBlock(16, 4, kernel_sizes)
    for spatial in block.spatial_convs:
        torch.nn.init.normal_(spatial.bias, std=0.5)
    x = torch.randn(2, 16, 6, 4, 8, requires_grad=True)
    assert block.narrow_groups
    folded = block(x)
    folded_grads = torch.autograd.grad(folded.square().sum(), [x, *block.parameters()])
    block.narrow_groups = False
    plain = block(x)
    plain_grads = torch.autograd.grad(plain.square().sum(), [x, *block.parameters()])
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
    scale = max(g.abs().max() for g in plain_grads)  # conv biases before a norm have ~0 gradient: absolute check
    for got, expected in zip(folded_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)
    odd = torch.randn(1, 16, 4, 4, 5)  # an odd width cannot be folded: the plain convs run
    plain = block(odd)
    block.narrow_groups = True
    assert torch.equal(block(odd), plain)
