"""JLC block: Johnson-Lindenstrauss guided grouped convolution."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .norm import instance_norm


class JLCBlock(nn.Module):
    """Multi-kernel grouped conv branch plus a 1x1x1 expansion MLP, both residual.

    ``y = x + sum_k GELU(IN(conv_k(x)))`` over the kernel sizes (a bare ``x + conv(x)`` with a single
    kernel size), then ``z = y + Dropout(project(GELU(expand(IN(y)))))``. Every conv is grouped with
    ``groups`` groups, each ``dim // groups`` channels wide: the JL lemma bounds how narrow a random
    projection may be and still keep distances, hence a minimum group width instead of depth-wise.

    Shapes: (B, dim, D, H, W) -> (B, dim, D, H, W).
    """

    def __init__(
        self,
        dim: int,
        groups: int,
        kernel_sizes: Sequence[int] = (1, 3, 5),
        expansion: int = 3,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.spatial_convs = nn.ModuleList(
            nn.Conv3d(dim, dim, k, padding=k // 2, groups=groups) for k in kernel_sizes
        )
        self.expand = nn.Conv3d(dim, dim * expansion, kernel_size=1)
        self.project = nn.Conv3d(dim * expansion, dim, kernel_size=1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.spatial_convs) == 1:
            y = x + self.spatial_convs[0](x)
        else:
            y = x
            for conv in self.spatial_convs:
                y = y + F.gelu(instance_norm(conv(x)))
        return y + self.drop(self.project(F.gelu(self.expand(instance_norm(y)))))
