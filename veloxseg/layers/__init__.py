"""Building blocks of VeloxSeg: JLC, paired-window attention, patch merging, 3D pixel shuffle.

The attention stream works on channels-last (B, D, H, W, C) tensors, the conv stream on
channels-first (B, C, D, H, W) ones."""

from .checkpointing import CheckpointedSequential
from .conv import OneDNNConv3d, PatchConv3d, PointwiseConv3d
from .detail import DetailPath
from .jlc import JLCBlock
from .norm import instance_norm
from .patch_merging import PatchMerging3d
from .pixel_shuffle import pixel_shuffle_3d
from .pwa import PairedWindowAttention, PWABlock, WindowScale, window_scales

__all__ = [
    "CheckpointedSequential",
    "DetailPath",
    "JLCBlock",
    "OneDNNConv3d",
    "PairedWindowAttention",
    "PatchConv3d",
    "PatchMerging3d",
    "PointwiseConv3d",
    "PWABlock",
    "WindowScale",
    "instance_norm",
    "pixel_shuffle_3d",
    "window_scales",
]
