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


class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 conv applied to a channels-last tensor: (..., C_in) -> (..., C_out).

    Parameters keep the conv's (C_out, C_in, 1, 1, 1) shape, so checkpoints of the channels-first
    network load unchanged; the product itself is one GEMM over the last axis, with no layout copies.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.flatten(1), self.bias)


# PyTorch's CPU weight gradient of a grouped 3-D conv is slow for few channels: with 32 input channels
# in 4 groups (veloxseg_small's level 1, width-folded, batch 2 x 64^3, one thread) the 5x5x3 kernel's
# takes 13.9 ms, the dense conv's on the same tensors 6.2 ms; from 64 channels on dense is the slower
# (2.5x at 64 channels in 8 groups). Measured for every JLC conv of tiny, small and base.
DENSE_WEIGHT_GRAD_MAX_CHANNELS = 32


def grouped_conv3d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, ...], groups: int
) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=padding, groups=groups)`` (stride 1), the same forward; when
    training on the CPU in float32 with at most ``DENSE_WEIGHT_GRAD_MAX_CHANNELS`` input channels, its weight
    gradient is the dense conv's, of which only the diagonal blocks are kept (:class:`_DenseWeightGradConv3d`).
    Shapes: (B, C_in, D, H, W) -> (B, C_out, D, H, W)."""
    if (
        groups > 1
        and x.shape[1] <= DENSE_WEIGHT_GRAD_MAX_CHANNELS
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")  # bf16 autocast: PyTorch's own conv and backward
        and weight.requires_grad
        and torch.is_grad_enabled()
        and eager()
    ):
        return _DenseWeightGradConv3d.apply(x, weight, bias, tuple(padding), groups)
    return F.conv3d(x, weight, bias, padding=padding, groups=groups)


class _DenseWeightGradConv3d(torch.autograd.Function):
    """Grouped conv whose backward computes the weight gradient as that of the dense conv (C_out, C_in, k)
    and keeps its ``groups`` diagonal blocks: more FLOPs, but on a faster CPU path. The input gradient
    is the grouped conv's own."""

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
            c_out, c_in_group, *kernel = weight.shape
            dense = weight.new_empty(c_out, c_in_group * groups, *kernel)  # only its shape is read
            grad_dense = torch.ops.aten.convolution_backward(
                grad, x, dense, None, ones, ctx.padding, ones, False, zeros, 1, [False, True, False]
            )[1]
            blocks = grad_dense.view(groups, c_out // groups, groups, c_in_group, *kernel)
            grad_weight = torch.stack([blocks[g, :, g] for g in range(groups)]).view(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3, 4))
        return grad_x, grad_weight, grad_bias, None, None
