"""MONAI networks that VeloxSeg is compared with, built the same way by every benchmark.

Sizes follow each network's common 3-D segmentation setting; SwinUNETR uses a small feature size
(24) as the issue asks, and MedNeXt its S variant.
"""

from collections.abc import Callable, Sequence

from monai.networks import nets
from monai.networks.nets.mednext import create_mednext
from torch import nn


def dynunet(in_ch: int, n_classes: int, roi: Sequence[int]) -> nn.Module:
    """nnU-Net-like: 6 levels, 3^3 kernels, strides 1, 2, 2, 2, 2, 2 (nnU-Net's 3-D full-res at 96^3-128^3)."""
    strides = [1, 2, 2, 2, 2, 2]
    return nets.DynUNet(3, in_ch, n_classes, kernel_size=[3] * 6, strides=strides, upsample_kernel_size=strides[1:],
                        filters=[32, 64, 128, 256, 320, 320], res_block=False)  # fmt: skip


MONAI_MODELS: dict[str, Callable[[int, int, Sequence[int]], nn.Module]] = {
    "SegResNet": lambda i, o, roi: nets.SegResNet(3, init_filters=16, in_channels=i, out_channels=o),
    "UNet": lambda i, o, roi: nets.UNet(3, i, o, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2)),
    "UNETR": lambda i, o, roi: nets.UNETR(i, o, img_size=tuple(roi)),
    "DynUNet": dynunet,
    "MedNeXt-S": lambda i, o, roi: create_mednext("S", spatial_dims=3, in_channels=i, out_channels=o),
    "SwinUNETR": lambda i, o, roi: nets.SwinUNETR(i, o, feature_size=24),
}


def build(name: str, in_ch: int, n_classes: int, roi: Sequence[int]) -> nn.Module:
    """A MONAI baseline by name (see ``MONAI_MODELS``)."""
    if name not in MONAI_MODELS:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(MONAI_MODELS)}")
    return MONAI_MODELS[name](in_ch, n_classes, roi)
