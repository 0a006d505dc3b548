"""Convolutions tuned for CPUs: oneDNN 3-D convs, 1x1x1 convs on channels-last tensors, and faster CPU
backward passes for narrow convs while training."""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def eager() -> bool:
    """False while torch.compile, torch.export or TorchScript tracing records the graph: CPU shortcuts
    that they cannot record (or that inductor does better itself) step aside for the portable ops."""
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing())


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs on oneDNN (mkldnn) for float32 CPU tensors.

    PyTorch's backend choice sends batch-1 3-D convs with few input channels (e.g. the 16 -> 128
    3x3x3 segmentation head at 24^3) to its slow im2col path, about 3x slower than oneDNN on the
    same input. Same parameters and outputs as ``nn.Conv3d``; other devices and dtypes use it, and so
    does CPU code under ``torch.backends.mkldnn.flags(enabled=False)`` (e.g. to count FLOPs) and code
    being compiled, exported or traced.

    With ``channels_last_input=True`` oneDNN gets a channels-last copy of the input and writes a
    channels-last output without reordering it: worth it when the output is much wider than the
    input (the head's 128 output channels: 13 instead of 20 ms).

    With ``channels_last_backward=True`` the training backward runs on channels-last copies of the
    input and of the output gradient (:class:`_ChannelsLastBackwardConv3d`): PyTorch's channels-first
    CPU backward is slow for narrow convs (the detail path's 8 -> 8 3^3 conv at 2 x 32^3, one thread:
    5.8 instead of 18.7 ms, the copies included; no gain for the 16 -> 128 head).
    """

    def __init__(
        self, *args: Any, channels_last_input: bool = False, channels_last_backward: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.channels_last_input = channels_last_input
        self.channels_last_backward = channels_last_backward

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.channels_last_input and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.enabled and eager():
            geometry = (self.padding, self.stride, self.dilation, self.groups)
            if (
                self.channels_last_backward
                and torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu")
                and (x.requires_grad or weight.requires_grad)
            ):
                return _ChannelsLastBackwardConv3d.apply(x, weight, bias, *geometry)
            return torch.ops.aten.mkldnn_convolution(x, weight, bias, *geometry)
        return super()._conv_forward(x, weight, bias)


class _ChannelsLastBackwardConv3d(torch.autograd.Function):
    """oneDNN conv whose backward gets channels-last input and output gradient (see :class:`OneDNNConv3d`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, stride, dilation, groups):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        layout = torch.channels_last_3d
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad.contiguous(memory_format=layout), x.contiguous(memory_format=layout), weight,
            [weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation, False, [0, 0, 0], groups, wanted,
        )  # fmt: skip
        return grad_x, grad_weight, grad_bias, None, None, None, None


class PatchConv3d(nn.Conv3d):
    """Patch embedding: ``nn.Conv3d(in_ch, out_ch, p, stride=p)``, each output voxel reads its own p^3 patch.

    Same parameters and forward as ``nn.Conv3d``. While training on the CPU in float32 its backward is
    two GEMMs over the patches (:class:`_PatchConvBackward`): PyTorch's CPU weight gradient of this
    conv is slow (veloxseg_small_hr's 1 -> 16 4^3 embedding at 2 x 64^3, one thread, an AVX2 AMD EPYC: 50 ms
    in a training step, 9 ms alone; the GEMM takes 4 ms).
    """

    def __init__(self, in_channels: int, out_channels: int, patch_size: int) -> None:
        super().__init__(in_channels, out_channels, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and torch.is_grad_enabled()
            and (x.requires_grad or self.weight.requires_grad)
            and eager()
        ):
            return _PatchConvBackward.apply(x, self.weight, self.bias)
        return super().forward(x)


def patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, D, H, W) -> (B * D/p * H/p * W/p, C * p^3): one row per non-overlapping p^3 patch."""
    b, c, d, h, w = x.shape
    x = x.view(b, c, d // p, p, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(-1, c * p**3)


class _PatchConvBackward(torch.autograd.Function):
    """A kernel = stride conv with its backward as GEMMs over the patches (see :class:`PatchConv3d`)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, stride=weight.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        p, c_out = weight.shape[-1], weight.shape[0]
        rows = grad.permute(0, 2, 3, 4, 1).reshape(-1, c_out)  # (B * N, C_out), N = patches per volume
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            b, c, d, h, w = x.shape
            grad_patches = (rows @ weight.reshape(c_out, -1)).view(b, d // p, h // p, w // p, c, p, p, p)
            grad_x = grad_patches.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = (rows.t() @ patches(x, p)).view(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 conv applied to a channels-last tensor: (..., C_in) -> (..., C_out).

    Parameters keep the conv's (C_out, C_in, 1, 1, 1) shape, so checkpoints of the channels-first
    network load unchanged; the product itself is one GEMM over the last axis, with no layout copies.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.flatten(1), self.bias)


# PyTorch's CPU weight gradient of a grouped 3-D conv is slow for few channels; on channels-last copies of
# the input and of the output gradient it is 2.5-4x faster (batch 2, one thread, an AMD EPYC with AVX-512,
# torch 2.14, copies included: the level-1 width-folded 5x5x3 conv, 32 channels in 4 groups at 16x16x8,
# 3.4 ms instead of 8.8 ms, or 5.6 ms as the dense conv's gradient cut to its diagonal blocks; 64 channels
# in 8 groups at 4^3, 5^3: 0.34 instead of 1.35 ms; an AVX2-only EPYC: 14.5 instead of 17.6 ms). Not for
# 1x1x1 kernels (0.58 instead of 0.07 ms) nor from 128 channels on (2.4 instead of 0.4 ms).
FAST_WEIGHT_GRAD_MAX_CHANNELS = 64


def grouped_conv3d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, ...], groups: int
) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=padding, groups=groups)`` (stride 1), the same forward; when
    training on the CPU in float32 with at most ``FAST_WEIGHT_GRAD_MAX_CHANNELS`` input channels and a kernel
    wider than one voxel, its weight gradient is computed on channels-last tensors (:class:`_FastWeightGradConv3d`).
    Shapes: (B, C_in, D, H, W) -> (B, C_out, D, H, W)."""
    if (
        groups > 1
        and x.shape[1] <= FAST_WEIGHT_GRAD_MAX_CHANNELS
        and weight.shape[2:].numel() > 1
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")  # bf16 autocast: PyTorch's own conv and backward
        and weight.requires_grad
        and torch.is_grad_enabled()
        and eager()
    ):
        return _FastWeightGradConv3d.apply(x, weight, bias, tuple(padding), groups)
    return F.conv3d(x, weight, bias, padding=padding, groups=groups)


class _FastWeightGradConv3d(torch.autograd.Function):
    """Grouped conv whose backward computes the weight gradient with PyTorch's grouped kernel on channels-last
    copies of the input and of the output gradient. The input gradient is PyTorch's own."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, groups):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.groups, ctx.has_bias = padding, groups, bias is not None
        return F.conv3d(x, weight, bias, padding=padding, groups=groups)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        groups, ones, zeros = ctx.groups, [1, 1, 1], [0, 0, 0]
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, ones, ctx.padding, ones, False, zeros, groups, [True, False, False]
            )[0]
        if ctx.needs_input_grad[1]:
            layout = torch.channels_last_3d
            grad_weight = torch.ops.aten.convolution_backward(
                grad.contiguous(memory_format=layout), x.contiguous(memory_format=layout), weight, None,
                ones, ctx.padding, ones, False, zeros, groups, [False, True, False],
            )[1].contiguous()  # fmt: skip
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3, 4))
        return grad_x, grad_weight, grad_bias, None, None


def conv3x3_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=1)`` for 8 -> 8 channels, on the CPU kernel
    ``torch.ops.veloxseg.conv3x3_channels_last`` with its backward (:class:`_Conv3x3ChannelsLast`): x
    (B, 8, D, H, W), float32 or float64, best channels-last -> channels-last (B, 8, D, H, W).

    For training: oneDNN's blocked kernels suit wider convs; at the detail path's 8 channels (2 x 8 x 32^3,
    one thread, an AMD EPYC with AVX-512) the kernel takes 2.9 instead of 4.1 ms forward and 5.7 instead of
    8.8 ms backward. The caller checks :func:`veloxseg.layers.cpu_kernels.cpu_kernels_available`.
    """
    if weight.shape != (8, 8, 3, 3, 3) or x.dim() != 5 or x.shape[1] != 8:
        raise ValueError(
            f"conv3x3_channels_last: needs x (B, 8, D, H, W) and weight (8, 8, 3, 3, 3), got {tuple(x.shape)} "
            f"and {tuple(weight.shape)}"
        )
    return _Conv3x3ChannelsLast.apply(x, weight, bias)


class _Conv3x3ChannelsLast(torch.autograd.Function):
    """:func:`conv3x3_channels_last` on the kernels, which take x as (B, D, H, W, 8) and the weight as
    (27 taps, 8 in, 8 out)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        voxels = x.permute(0, 2, 3, 4, 1).contiguous()  # a view when x is channels-last
        taps = weight.permute(2, 3, 4, 1, 0).reshape(27, 8, 8).contiguous()
        ctx.save_for_backward(voxels, taps)
        ctx.has_bias = bias is not None
        out = torch.ops.veloxseg.conv3x3_channels_last(voxels, taps, None if bias is None else bias.contiguous())
        return out.permute(0, 4, 1, 2, 3)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        voxels, taps = ctx.saved_tensors
        grad_voxels = grad.permute(0, 2, 3, 4, 1).contiguous()
        grad_x, grad_taps = torch.ops.veloxseg.conv3x3_channels_last_backward(grad_voxels, voxels, taps)
        grad_weight = grad_taps.view(3, 3, 3, 8, 8).permute(4, 3, 0, 1, 2).contiguous()
        grad_bias = grad_voxels.sum((0, 1, 2, 3)) if ctx.has_bias else None
        return grad_x.permute(0, 4, 1, 2, 3), grad_weight, grad_bias
