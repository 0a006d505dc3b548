"""A light half-resolution path that turns half-resolution logits into full-resolution ones.

Not part of the paper's network: the ``*_hr`` variants add it. VeloxSeg reaches full resolution
only through one 4x pixel shuffle of 1/4-resolution features, so at short training budgets it
learns nothing finer than a 4^3 block (on the MNI152 tissue task a predictor constant over 4^3
blocks scores at most 0.715 Dice, over 2^3 blocks 0.834). In an ``*_hr`` variant the head predicts
only 2^3 sub-blocks per 1/4-resolution voxel (half-resolution logits, 8x fewer head FLOPs than the
paper's 4^3), and this path adds the rest: it reads the input at 1/2 resolution, joins it with the
decoder's last feature u_1 brought up to 1/2 resolution, and predicts a 2^3 block of logit
corrections per half-resolution voxel.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .conv import OneDNNConv3d, eager
from .cpu_kernels import cpu_kernels_available
from .norm import gelu_instance_norm
from .pixel_shuffle import pixel_shuffle_3d


class DetailPath(nn.Module):
    """Full-resolution logits (B, n_classes, D, H, W) from half-resolution ones, the input and u_1.

    ``stem`` reads the input: (B, in_ch, D, H, W) -> (B, width, D/2, H/2, W/2), a 4^3 stride-2 conv
    (overlapping windows: a 2^3 one, or no 3^3 conv after it, learned less on the MNI152 tissue task).
    ``forward(stem_out, u1, coarse)``: u_1 (B, u1_ch, D/4, H/4, W/4) is brought to 1/2 resolution by a
    2^3 transposed conv, concatenated with the stem's output, mixed by a 1x1 and a 3^3 conv (instance
    norm and GELU after each) and a 1x1 conv into 2^3 corrections per class; each class's 2^3
    corrections are added to its half-resolution logit from ``coarse`` (B, n_classes, D/2, H/2, W/2),
    then pixel-shuffled by 2 (the same as adding them to the nearest-upsampled logits, without a
    full-resolution sum).
    The 3^3 conv is dense: a depth-wise one has as few FLOPs but its CPU backward took 2.5x as long;
    it runs on oneDNN, which PyTorch skips for 8 channels (74 instead of 4 ms at 48^3, one thread), and
    its backward on channels-last tensors.
    The last conv starts at zero, so an untrained path only upsamples ``coarse``; it, the add and the
    shuffle are :func:`detail_logits` (one CPU kernel pass forward and one backward while training).
    """

    def __init__(self, in_ch: int, u1_ch: int, width: int, n_classes: int) -> None:
        super().__init__()
        self.stem = OneDNNConv3d(in_ch, width, 4, stride=2, padding=1)
        self.up = nn.ConvTranspose3d(u1_ch, width, 2, stride=2)
        self.mix = nn.Conv3d(2 * width, width, 1)
        self.spatial = OneDNNConv3d(width, width, 3, padding=1, channels_last_input=True, channels_last_backward=True)
        self.out = nn.Conv3d(width, 8 * n_classes, 1)

    def reset_output(self) -> None:
        """Zero the last conv (call after any init that touches every conv)."""
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, stem: torch.Tensor, u1: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        x = torch.cat([stem, self.up(u1)], 1)
        x = gelu_instance_norm(self.mix(x))
        x = gelu_instance_norm(self.spatial(x))
        return detail_logits(x, self.out.weight, self.out.bias, coarse)


def detail_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, coarse: torch.Tensor
) -> torch.Tensor:
    """``pixel_shuffle_3d(conv1x1(x) + coarse.repeat_interleave(8, 1), 2)``: x (B, K, D, H, W), weight
    (8C, K, 1, 1, 1), bias (8C,), coarse (B, C, D, H, W) -> (B, C, 2D, 2H, 2W).

    While autograd records on the CPU (float32 or float64, eager) and the CPU kernels are built, it runs
    as ``torch.ops.veloxseg.detail_logits`` with its one-pass backward (:class:`_DetailLogits`); otherwise
    as the PyTorch ops above (also in eval, so inference outputs do not depend on the kernels).
    """
    if (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and eager()
        and cpu_kernels_available()
    ):
        return _DetailLogits.apply(x, weight, bias, coarse)
    return pixel_shuffle_3d(F.conv3d(x, weight, bias) + coarse.repeat_interleave(8, dim=1), 2)


class _DetailLogits(torch.autograd.Function):
    """:func:`detail_logits` on the CPU kernels ``detail_logits`` / ``detail_logits_backward``."""

    @staticmethod
    def forward(ctx, x, weight, bias, coarse):  # type: ignore[override]
        x, matrix = x.contiguous(), weight.flatten(1).contiguous()
        ctx.save_for_backward(x, matrix)
        ctx.weight_shape = weight.shape
        return torch.ops.veloxseg.detail_logits(x, matrix, bias.contiguous(), coarse.contiguous())

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, matrix = ctx.saved_tensors
        grad_x, grad_weight, grad_bias, grad_coarse = torch.ops.veloxseg.detail_logits_backward(
            grad.contiguous(), x, matrix
        )
        return grad_x, grad_weight.view(ctx.weight_shape), grad_bias, grad_coarse
