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

from .conv import OneDNNConv3d, conv3x3_channels_last, eager
from .cpu_kernels import cpu_kernels_available
from .norm import gelu_instance_norm
from .pixel_shuffle import pixel_shuffle_3d


class DetailStem(OneDNNConv3d):
    """The detail path's stem, ``OneDNNConv3d(in_ch, width, 4, stride=2, padding=1)``: (B, in_ch, D, H, W) ->
    (B, width, D/2, H/2, W/2).

    While training on the CPU with the kernels built, 8 output channels, even D, H, W and no gradient wanted in
    the input (the image), it runs as ``torch.ops.veloxseg.stem_conv`` with its weight gradient
    (:class:`_StemConv`; 2 x 1 x 64^3, one thread: 1.05 instead of 1.35-1.5 ms forward, the weight gradient
    1.35 ms against oneDNN's 1.5 alone and 2.5-3.9 in the step). Otherwise, eval and inference included,
    oneDNN's conv.
    """

    def __init__(self, in_ch: int, width: int) -> None:
        super().__init__(in_ch, width, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.out_channels == 8
            and x.dim() == 5
            and all(n % 2 == 0 for n in x.shape[2:])
            and not x.requires_grad
            and _fast_training(x)
        ):
            return _StemConv.apply(x, self.weight, self.bias)
        return super().forward(x)


class _StemConv(torch.autograd.Function):
    """:class:`DetailStem`'s conv on the kernels ``stem_conv`` / ``stem_conv_weight_grad``, which read each input
    row as its even then its odd voxels, each zero-padded by one: (B, C, D, H, 2, W/2 + 2)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        b, c, d, h, w = x.shape
        phases = F.pad(x.view(b, c, d, h, w // 2, 2).transpose(4, 5), (1, 1)).contiguous()
        ctx.save_for_backward(phases, weight)
        return torch.ops.veloxseg.stem_conv(phases, weight.contiguous(), bias.contiguous())

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        phases, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_weight = torch.ops.veloxseg.stem_conv_weight_grad(grad, phases, weight.contiguous())
        return None, grad_weight, grad.sum((0, 2, 3, 4))


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

    While training on the CPU with the kernels built (:func:`_fast_training`), the path up to the last conv
    runs channels-last, forward and backward without layout copies: the transposed conv, concatenation
    and mix as two matrix products (:meth:`mix_upsampled`), the norms on the channels-last kernel, and
    an 8-channel 3^3 conv on :func:`~veloxseg.layers.conv.conv3x3_channels_last`; with :class:`DetailStem`,
    the path alone takes 0.78x the time of the ops above (forward and backward at 2 x 64^3, one thread).
    Eval and inference keep the ops above.
    """

    def __init__(self, in_ch: int, u1_ch: int, width: int, n_classes: int) -> None:
        super().__init__()
        self.stem = DetailStem(in_ch, width)
        self.up = nn.ConvTranspose3d(u1_ch, width, 2, stride=2)
        self.mix = nn.Conv3d(2 * width, width, 1)
        self.spatial = OneDNNConv3d(width, width, 3, padding=1, channels_last_input=True, channels_last_backward=True)
        self.out = nn.Conv3d(width, 8 * n_classes, 1)

    def reset_output(self) -> None:
        """Zero the last conv (call after any init that touches every conv)."""
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, stem: torch.Tensor, u1: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        if _fast_training(stem):
            x = gelu_instance_norm(self.mix_upsampled(stem, u1))  # channels-last from here on
            if self.spatial.in_channels == 8:
                x = gelu_instance_norm(conv3x3_channels_last(x, self.spatial.weight, self.spatial.bias))
            else:
                x = gelu_instance_norm(self.spatial(x))
        else:
            x = gelu_instance_norm(self.mix(torch.cat([stem, self.up(u1)], 1)))
            x = gelu_instance_norm(self.spatial(x))
        return detail_logits(x, self.out.weight, self.out.bias, coarse)

    def mix_upsampled(self, stem: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
        """``mix(cat([stem, up(u1)]))`` as matrix products (:class:`_MixUpsampled`), channels-last out.

        The mix is linear, so its half that reads ``up(u1)`` folds into the transposed conv: one product of
        u_1 with the composed (u1_ch, 2^3 width) weight at 1/4 resolution, whose 2^3 sub-voxels are added in
        place to the stem's half. The concatenation and the upsampled tensor are not written, and the
        output is channels-last for the 3^3 conv.
        """
        c = stem.shape[1]
        if stem.dim() != 5 or u1.dim() != 5 or stem.shape[2:] != tuple(2 * n for n in u1.shape[2:]):
            raise ValueError(
                f"DetailPath: the stem output {tuple(stem.shape)} must be twice u_1 {tuple(u1.shape)} in each "
                "spatial size"
            )
        stem_weight, up_mix = self.mix.weight.flatten(1).split([c, self.up.out_channels], 1)
        composed = torch.einsum("po,coijk->cijkp", up_mix, self.up.weight).reshape(self.up.in_channels, 8 * c)
        bias = (self.mix.bias + up_mix @ self.up.bias).repeat(8)
        return _MixUpsampled.apply(stem, u1, stem_weight, composed, bias)


class _MixUpsampled(torch.autograd.Function):
    """stem (B, C, D, H, W), u1 (B, U, D/2, H/2, W/2), stem_weight (C, C), composed
    (U, 2^3 C: sub-voxel, channel), bias (2^3 C,) -> channels-last (B, C, D, H, W): ``stem_weight`` applied
    to the stem plus, at each 2^3 block, ``composed`` applied to its u1 voxel, and the bias."""

    @staticmethod
    def forward(ctx, stem, u1, stem_weight, composed, bias):  # type: ignore[override]
        ctx.save_for_backward(stem, u1, stem_weight, composed)
        b, c, d, h, w = stem.shape
        # (N x 8) @ (8 x 8) products are slow in BLAS (1.2 ms at 2 x 32^3 against 0.2 ms for (8 x 8) @ (8 x N)):
        # the stem's half is taken channels-first and transposed, then the up half added in its 2^3 blocks.
        x = torch.bmm(stem_weight.expand(b, -1, -1), stem.flatten(2)).transpose(1, 2).contiguous()  # (B, DHW, C)
        up = torch.baddbmm(bias, u1.flatten(2).transpose(1, 2), composed.expand(b, -1, -1))  # (B, DHW / 8, 8C)
        blocks = x.view(b, d // 2, 2, h // 2, 2, w // 2, 2, c)
        blocks.add_(up.view(b, d // 2, h // 2, w // 2, 2, 2, 2, c).permute(0, 1, 4, 2, 5, 3, 6, 7))
        return x.view(b, d, h, w, c).permute(0, 4, 1, 2, 3)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        stem, u1, stem_weight, composed = ctx.saved_tensors
        b, c, d, h, w = stem.shape
        rows = grad.permute(0, 2, 3, 4, 1).reshape(b, -1, c)  # (B, DHW, C), a view when grad is channels-last
        columns = rows.transpose(1, 2).contiguous()  # (B, C, DHW): faster products than transposed operands
        grad_stem = torch.bmm(stem_weight.t().expand(b, -1, -1), columns).view(stem.shape)
        grad_stem_weight = torch.bmm(columns, stem.flatten(2).transpose(1, 2)).sum(0)
        grad_up = rows.view(b, d // 2, 2, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        grad_up = grad_up.reshape(b, -1, 8 * c)  # (B, DHW / 8, 8C)
        grad_u1 = torch.bmm(composed.expand(b, -1, -1), grad_up.transpose(1, 2)).view(u1.shape)
        grad_composed = torch.bmm(u1.flatten(2), grad_up).sum(0)
        return grad_stem, grad_u1, grad_stem_weight, grad_composed, grad_up.sum((0, 1))


def _fast_training(x: torch.Tensor) -> bool:
    """Whether the CPU training paths apply to x: autograd recording on the CPU in float32 or float64, eager,
    no autocast, the CPU kernels built."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and eager()
        and cpu_kernels_available()
    )


def detail_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, coarse: torch.Tensor
) -> torch.Tensor:
    """``pixel_shuffle_3d(conv1x1(x) + coarse.repeat_interleave(8, 1), 2)``: x (B, K, D, H, W), weight
    (8C, K, 1, 1, 1), bias (8C,), coarse (B, C, D, H, W) -> (B, C, 2D, 2H, 2W).

    While autograd records on the CPU (float32 or float64, eager) and the CPU kernels are built, it runs
    as ``torch.ops.veloxseg.detail_logits`` with its one-pass backward (:class:`_DetailLogits`); otherwise
    as the PyTorch ops above (also in eval, so inference outputs do not depend on the kernels).
    """
    if _fast_training(x):
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
