"""Per-channel intensity normalisation from a model's metadata, for inference.

The trainer normalises with MONAI transforms (``veloxseg.data.transforms``) and records what they do
in the metadata it saves (``veloxseg.train.channel_metadata``); ``veloxseg predict`` applies
:func:`normalise_channels` from that metadata, so a scan is preprocessed the same way at both ends
(``tests/test_predict.py`` checks that the two agree). The spatial part (orientation, spacing) is
MONAI's ``Orientation``/``Spacing`` with the metadata's ``orientation`` and ``spacing``.
"""

from collections.abc import Sequence

import torch
from monai.transforms import NormalizeIntensity
from monai.utils import convert_to_tensor

from .metadata import ChannelInfo

NORMALISATIONS = ("ct", "zscore", "none")


def normalise_channel(x: torch.Tensor, info: ChannelInfo) -> torch.Tensor:
    """One channel (D, H, W) -> (D, H, W) float32, normalised as ``info.normalisation`` says.

    "ct": clip to ``info.clip`` (when set), then ``(x - mean) / std`` with the dataset's statistics.
    "zscore": z-score over this scan's nonzero voxels; zero (background) voxels stay 0.
    "none": unchanged.
    """
    x = x.float()
    if info.normalisation == "ct":
        if info.mean is None or not info.std:
            raise ValueError(f"channel {info.name!r}: 'ct' normalisation needs the dataset's mean and a nonzero std")
        if info.clip is not None:
            x = x.clamp(*info.clip)
        return (x - info.mean) / info.std
    if info.normalisation == "zscore":
        return convert_to_tensor(NormalizeIntensity(nonzero=True)(x), track_meta=False)
    if info.normalisation == "none":
        return x
    raise ValueError(
        f"channel {info.name!r}: unknown normalisation {info.normalisation!r}; use one of {NORMALISATIONS}"
    )


def normalise_channels(image: torch.Tensor, channels: Sequence[ChannelInfo]) -> torch.Tensor:
    """(C, D, H, W) -> (C, D, H, W) float32, channel c normalised as ``channels[c]`` says."""
    if image.shape[0] != len(channels):
        raise ValueError(f"the metadata describes {len(channels)} channel(s) but the image has {image.shape[0]}")
    return torch.stack([normalise_channel(x, info) for x, info in zip(image, channels)])
