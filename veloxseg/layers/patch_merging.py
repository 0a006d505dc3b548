"""Patch merging between attention levels: 2x downsampling by space-to-depth."""

import torch
from torch import nn

from .conv import PointwiseConv3d


class PatchMerging3d(nn.Module):
    """Channels-last (B, D, H, W, A) -> (B, D/2, H/2, W/2, 2A).

    The eight stride-2 sub-grids are stacked along channels in offset order
    000, 001, 010, ..., 111 (d, h, w), normalised with a layer norm (eps 1e-6) over the 8A channels
    and projected to 2A channels by a bias-free 1x1x1 conv.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim, eps=1e-6)
        self.reduction = PointwiseConv3d(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, a = x.shape
        x = x.view(b, d // 2, 2, h // 2, 2, w // 2, 2, a)
        x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, d // 2, h // 2, w // 2, 8 * a)
        return self.reduction(self.norm(x))
