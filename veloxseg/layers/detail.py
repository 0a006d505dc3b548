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

from .conv import OneDNNConv3d
from .norm import instance_norm
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
    The last conv starts at zero, so an untrained path only upsamples ``coarse``.
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
        x = F.gelu(instance_norm(self.mix(x)))
        x = F.gelu(instance_norm(self.spatial(x)))
        return pixel_shuffle_3d(self.out(x) + coarse.repeat_interleave(8, dim=1), 2)
