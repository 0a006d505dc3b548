"""Convolutions tuned for CPU inference: oneDNN 3-D convs, and 1x1x1 convs on channels-last tensors."""

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
    """

    def __init__(self, *args: Any, channels_last_input: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channels_last_input = channels_last_input

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.channels_last_input and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.enabled and eager():
            return torch.ops.aten.mkldnn_convolution(
                x, weight, bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super()._conv_forward(x, weight, bias)


class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 conv applied to a channels-last tensor: (..., C_in) -> (..., C_out).

    Parameters keep the conv's (C_out, C_in, 1, 1, 1) shape, so checkpoints of the channels-first
    network load unchanged; the product itself is one GEMM over the last axis, with no layout copies.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.flatten(1), self.bias)
