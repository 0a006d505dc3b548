"""Building blocks of VeloxSeg: JLC, paired-window attention, patch merging, 3D pixel shuffle."""

from .conv import OneDNNConv3d
from .jlc import JLCBlock
from .norm import LayerNorm3d
from .patch_merging import PatchMerging3d
from .pixel_shuffle import pixel_shuffle_3d
from .pwa import PairedWindowAttention, PWABlock, WindowScale, window_scales

__all__ = [
    "JLCBlock",
    "LayerNorm3d",
    "OneDNNConv3d",
    "PairedWindowAttention",
    "PatchMerging3d",
    "PWABlock",
    "WindowScale",
    "pixel_shuffle_3d",
    "window_scales",
]
