"""JLC block: Johnson-Lindenstrauss guided grouped convolution."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from .conv import grouped_conv3d
from .norm import gelu_instance_norm, instance_norm

# oneDNN runs grouped 3-D convs with groups this narrow at about half the speed of 8-channel ones: on
# veloxseg_small's level 1 (16 channels, 24^3, 1 CPU thread) the 5^3 conv takes 3.9 ms, folded (below) 2.4 ms.
NARROW_GROUP = 4


def fold_width(x: torch.Tensor) -> torch.Tensor:
    """Space-to-depth along W: (B, C, D, H, W) -> (B, 2C, D, H, W/2), channel 2c + s holding voxels w = 2j + s."""
    b, c, d, h, w = x.shape
    return x.view(b, c, d, h, w // 2, 2).permute(0, 1, 5, 2, 3, 4).reshape(b, 2 * c, d, h, w // 2)


def unfold_width(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fold_width`: (B, 2C, D, H, W/2) -> (B, C, D, H, W)."""
    b, c2, d, h, w2 = x.shape
    return x.view(b, c2 // 2, 2, d, h, w2).permute(0, 1, 3, 4, 5, 2).reshape(b, c2 // 2, d, h, 2 * w2)


def fold_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight of a stride-1, odd-kernel, same-padded conv re-laid out for the width-folded input:
    (C_out, C_in / g, kd, kh, k) -> (2 C_out, 2 C_in / g, kd, kh, taps), taps = 2 * ((k // 2 + 1) // 2) + 1,
    so that ``fold_width(conv(x)) == conv3d(fold_width(x), folded, padding=(kd // 2, kh // 2, taps // 2))``.

    Output voxel 2j + s reads input 2j + s + t - k//2 through tap t, i.e. folded column j + u - reach at
    parity r where t = 2(u - reach) + r - s + k//2; folded taps whose t falls outside [0, k) are zero.
    """
    k = weight.shape[-1]
    reach = (k // 2 + 1) // 2  # folded columns on each side
    taps = 2 * reach + 1
    w = F.pad(weight, (taps, taps))  # zeros for the taps that fall outside [0, k)
    # folded[o, s, i, r, ..., u] = weight[o, i, ..., 2(u - reach) + r - s + k//2]
    start = taps + k // 2 - 2 * reach
    rows = [torch.stack([w[..., start + r - s :][..., : 2 * taps : 2] for r in range(2)], 2) for s in range(2)]
    return torch.stack(rows, 1).flatten(0, 1).flatten(1, 2)


def width_folded_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=k // 2, groups=groups)`` for an odd, stride-1 kernel, computed on
    ``fold_width(x)`` (W even): group widths double, the W taps halve. Shapes: (B, C, D, H, W) -> (B, C_out, D, H, W).
    """
    folded = fold_conv_weight(weight)
    bias = None if bias is None else bias.repeat_interleave(2)
    padding = tuple(k // 2 for k in folded.shape[2:])
    return unfold_width(grouped_conv3d(fold_width(x), folded, bias, padding, groups))


class JLCBlock(nn.Module):
    """Multi-kernel grouped conv branch plus a 1x1x1 expansion MLP, both residual.

    ``y = x + sum_k GELU(IN(conv_k(x)))`` over the kernel sizes (a bare ``x + conv(x)`` with a single
    kernel size), then ``z = y + DropPath(Dropout(project(GELU(expand(IN(y))))))`` (stochastic depth drops
    this branch only: the conv branch's residual is summed inside it). Every conv is grouped with
    ``groups`` groups, each ``dim // groups`` channels wide: the JL lemma bounds how narrow a random
    projection may be and still keep distances, hence a minimum group width instead of depth-wise.
    With groups of ``NARROW_GROUP`` channels or fewer the 3^3 and 5^3 convs run on the width-folded
    input (:func:`width_folded_conv3d`), the same function on twice as wide groups, except under
    ``torch.compile``: inductor lays the folded tensors out channels-last, where un-folding becomes a
    scalar gather (the compiled block ran 2x slower). ``veloxseg.optimize`` sets ``fused_kernel``: the
    whole conv branch then runs as one CPU kernel (``csrc/jlc_branch.cpp``), folded convs included.

    Shapes: (B, dim, D, H, W) -> (B, dim, D, H, W).
    """

    def __init__(
        self,
        dim: int,
        groups: int,
        kernel_sizes: Sequence[int] = (1, 3, 5),
        expansion: int = 3,
        drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.spatial_convs = nn.ModuleList(
            nn.Conv3d(dim, dim, k, padding=k // 2, groups=groups) for k in kernel_sizes
        )
        self.expand = nn.Conv3d(dim, dim * expansion, kernel_size=1)
        self.project = nn.Conv3d(dim * expansion, dim, kernel_size=1)
        self.drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()
        self.narrow_groups = dim // groups <= NARROW_GROUP
        # Set by veloxseg.optimize once torch.ops.veloxseg.jlc_folded_branch is built (CPU, inference only).
        self.fused_kernel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_branch(x)
        return y + self.drop_path(self.drop(self.project(F.gelu(self.expand(instance_norm(y))))))

    def _conv_branch(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused_kernel and x.device.type == "cpu" and not self.training
        if fused and self.narrow_groups and len(self.spatial_convs) > 1 and x.shape[-1] % 2 == 0:
            weights = [fold_conv_weight(conv.weight) for conv in self.spatial_convs]
            biases = [conv.bias.repeat_interleave(2) for conv in self.spatial_convs]
            return torch.ops.veloxseg.jlc_folded_branch(x, weights, biases, self.spatial_convs[0].groups)
        outputs = [self._spatial_conv(conv, x) for conv in self.spatial_convs]
        if len(outputs) == 1:
            return x + outputs[0]
        y = x
        for out in outputs:
            y = y + gelu_instance_norm(out)
        return y

    def _spatial_conv(self, conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        """``conv(x)``; with narrow groups and more than one W tap, computed on the width-folded input."""
        fold = self.narrow_groups and conv.kernel_size[-1] > 1 and x.shape[-1] % 2 == 0
        if fold and not torch.compiler.is_compiling():
            return width_folded_conv3d(x, conv.weight, conv.bias, conv.groups)
        return grouped_conv3d(x, conv.weight, conv.bias, conv.padding, conv.groups)
