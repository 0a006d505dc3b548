"""The one preprocessing of VeloxSeg: MONAI dictionary transforms built from a model's metadata.

Training, validation and ``veloxseg predict`` all run :func:`preprocessing_transforms` of the same
:class:`~veloxseg.metadata.ModelMetadata`: reorient to its ``orientation``, resample to its ``spacing``
(bilinear images, nearest labels) and normalise each channel as its :class:`ChannelInfo` says. The
trainer chooses the channels' normalisation (:func:`channel_infos`) and saves that metadata with the
model, so inference normalises with exactly the parameters training used.

Cases are ``{"image": [paths, one per channel], "label": path}``: per-channel files are stacked into
one (C, X, Y, Z) ``image`` by ``LoadImaged``; a single 4-D file (MSD layout) is loaded with its
channels moved first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import (
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotated,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    SplitDimd,
)

from veloxseg.data.datasets import Case
from veloxseg.metadata import ChannelInfo, ModelMetadata

IMAGE, LABEL = "image", "label"
KEYS = (IMAGE, LABEL)
CT_WINDOW = (-1000.0, 1000.0)  # HU mapped to [-1, 1]


def is_ct(channel_name: str) -> bool:
    """Whether a ``dataset.json`` channel name denotes CT (normalised with a fixed HU window)."""
    return channel_name.strip().upper() == "CT"


def channel_infos(channel_names: Sequence[str]) -> list[ChannelInfo]:
    """How the trainer normalises a dataset's channels, one modality group per channel.

    CT channels are clipped to ``CT_WINDOW`` (HU) and mapped linearly to [-1, 1] ("ct" with the
    window's centre as ``mean`` and its half-width as ``std``): a fixed mapping rather than a per-scan
    z-score, so a density means the same in every scan. Every other channel (MR, PET, ...) is
    z-scored over its nonzero voxels ("zscore").
    """
    lo, hi = CT_WINDOW
    ct = {"normalisation": "ct", "clip": CT_WINDOW, "mean": (lo + hi) / 2, "std": (hi - lo) / 2}
    return [ChannelInfo(name, group, **(ct if is_ct(name) else {})) for group, name in enumerate(channel_names)]


def channel_normalisation(key: str, info: ChannelInfo) -> list[MapTransform]:
    """The transforms normalising the one-channel item ``key`` (1, X, Y, Z) as ``info`` says.

    "ct": ``(clip(x, *info.clip) - info.mean) / info.std``; "zscore": z-score over this scan's nonzero
    voxels (zero voxels stay 0); "none": nothing.
    """
    if info.normalisation == "ct":
        if info.clip is None:
            return [NormalizeIntensityd(key, subtrahend=info.mean, divisor=info.std)]
        lo, hi = info.clip  # clip and map linearly: lo -> (lo - mean) / std, hi -> (hi - mean) / std
        b_min, b_max = (lo - info.mean) / info.std, (hi - info.mean) / info.std
        return [ScaleIntensityRanged(key, lo, hi, b_min=b_min, b_max=b_max, clip=True)]
    if info.normalisation == "zscore":
        return [NormalizeIntensityd(key, nonzero=True, channel_wise=True)]
    return []  # "none" (ChannelInfo accepts no other normalisation)


def normalisation_transforms(channels: Sequence[ChannelInfo]) -> list[MapTransform]:
    """``image`` (C, X, Y, Z) normalised channel by channel, channel c as ``channels[c]`` says."""
    keys = [f"{IMAGE}_{c}" for c in range(len(channels))]
    per_channel = [t for key, info in zip(keys, channels) for t in channel_normalisation(key, info)]
    return [
        SplitDimd(IMAGE, output_postfixes=[str(c) for c in range(len(channels))], dim=0, keepdim=True),
        *per_channel,
        ConcatItemsd(keys, name=IMAGE, dim=0),
        DeleteItemsd(keys),
    ]


def preprocessing_transforms(metadata: ModelMetadata) -> list[MapTransform]:
    """``image`` (C, X, Y, Z) and, when present, ``label`` (1, X, Y, Z), loaded MetaTensors, reoriented
    to ``metadata.orientation``, resampled to ``metadata.spacing`` mm (``None``: kept) and normalised."""
    transforms: list[MapTransform] = [
        Orientationd(KEYS, axcodes=metadata.orientation, labels=None, allow_missing_keys=True)
    ]
    if metadata.spacing is not None:
        transforms.append(
            Spacingd(
                KEYS, pixdim=metadata.spacing, mode=("bilinear", "nearest"), dtype=np.float32, allow_missing_keys=True
            )
        )
    return transforms + normalisation_transforms(metadata.channels)


def load_transform() -> LoadImaged:
    """Reads a case's files into (C, X, Y, Z) ``image`` and (1, X, Y, Z) ``label`` MetaTensors; a
    missing ``label`` key is allowed (unlabelled test cases)."""
    return LoadImaged(KEYS, ensure_channel_first=True, image_only=True, allow_missing_keys=True)


def train_transforms(
    metadata: ModelMetadata,
    roi_size: Sequence[int],
    num_samples: int = 2,
    pos: float = 1.0,
    neg: float = 1.0,
    rotate_deg: float = 15.0,
    rotate_prob: float = 0.5,
    flip_prob: float = 0.5,
) -> Compose:
    """Load and preprocess a case, then ``num_samples`` random ``roi_size`` patches with augmentation.

    Volumes smaller than ``roi_size`` are zero-padded (zero is the mean after z-scoring).
    Patches are centred on foreground with probability ``pos / (pos + neg)``, then rotated by up
    to ``rotate_deg`` about each axis (probability ``rotate_prob``) and flipped along each axis
    (probability ``flip_prob`` each). Output: ``image`` (C, *roi_size) and ``label`` (1, *roi_size)
    float32 tensors.
    """
    angle = torch.pi * rotate_deg / 180.0
    return Compose(
        [
            load_transform(),
            *preprocessing_transforms(metadata),
            SpatialPadd(KEYS, spatial_size=roi_size),
            RandCropByPosNegLabeld(
                KEYS, label_key=LABEL, spatial_size=roi_size, pos=pos, neg=neg, num_samples=num_samples
            ),
            RandRotated(
                KEYS,
                range_x=angle,
                range_y=angle,
                range_z=angle,
                prob=rotate_prob,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            *(RandFlipd(KEYS, prob=flip_prob, spatial_axis=axis) for axis in range(3)),
            EnsureTyped(KEYS, dtype=torch.float32),
        ]
    )


def eval_transforms(metadata: ModelMetadata) -> Compose:
    """Load and preprocess whole volumes (sliding-window inference pads them to the ROI itself)."""
    return Compose(
        [
            load_transform(),
            *preprocessing_transforms(metadata),
            EnsureTyped(KEYS, dtype=torch.float32, allow_missing_keys=True),
        ]
    )


def make_dataset(cases: Sequence[Case], transform: Compose, cache: bool = True) -> Dataset:
    """A MONAI dataset of ``cases``. With ``cache`` the deterministic preprocessing is done once and
    kept in memory (``CacheDataset``); the random augmentation still runs on every access."""
    data = [case.as_dict() for case in cases]
    return CacheDataset(data, transform, progress=False) if cache else Dataset(data, transform)
