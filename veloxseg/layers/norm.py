"""Channels-first layer norm for 5-D tensors."""

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, D, H, W) tensor, eps 1e-6 by default.

    timm's ``LayerNorm2d`` does the same for 4-D tensors only; this is its 3-D counterpart.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 4, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 4, 1, 2, 3)
