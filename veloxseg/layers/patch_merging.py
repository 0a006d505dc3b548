"""Patch merging between attention levels: 2x downsampling by space-to-depth."""

import torch
from torch import nn

from .norm import LayerNorm3d


class PatchMerging3d(nn.Module):
    """(B, A, D, H, W) -> (B, 2A, D/2, H/2, W/2).

    The eight stride-2 sub-grids are stacked along channels in offset order
    000, 001, 010, ..., 111 (d, h, w), normalised with a layer norm over the 8A channels and
    projected to 2A channels by a bias-free 1x1x1 conv.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm3d(8 * dim)
        self.reduction = nn.Conv3d(8 * dim, 2 * dim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, a, d, h, w = x.shape
        x = x.view(b, a, d // 2, 2, h // 2, 2, w // 2, 2)
        x = x.permute(0, 3, 5, 7, 1, 2, 4, 6).reshape(b, 8 * a, d // 2, h // 2, w // 2)
        return self.reduction(self.norm(x))
