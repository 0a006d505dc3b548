"""MONAI dictionary transforms and datasets for cases ``{"image": [paths, one per channel], "label": path}``.

Per-channel files are stacked into one (C, X, Y, Z) ``image`` by ``LoadImaged``; a single 4-D
file (MSD layout) is loaded with its channels moved first. Images and labels are then reoriented to
RAS, resampled to the target spacing (bilinear / nearest) and normalised channel by channel.
"""

from __future__ import annotations

from collections.abc import Sequence

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

from veloxseg.data.datasets import DatasetSpec, split_cases

IMAGE, LABEL = "image", "label"
KEYS = (IMAGE, LABEL)
CT_WINDOW = (-1000.0, 1000.0)


def is_ct(channel_name: str) -> bool:
    """Whether a ``dataset.json`` channel name denotes CT (normalised with a fixed HU window)."""
    return channel_name.strip().upper() == "CT"


def normalisation_transforms(
    channel_names: Sequence[str], ct_window: tuple[float, float] = CT_WINDOW
) -> list[MapTransform]:
    """Channel-wise intensity normalisation of ``image`` (C, X, Y, Z).

    CT channels are clipped to ``ct_window`` (HU) and mapped linearly to [-1, 1]: a fixed mapping
    rather than a per-scan z-score, so a density means the same in every scan (as with nnU-Net's
    dataset-wide CT normalisation). Every other channel (MR, PET, ...) is z-scored over its
    nonzero voxels.
    """
    ct_mapping = ScaleIntensityRanged(IMAGE, *ct_window, b_min=-1.0, b_max=1.0, clip=True)
    z_score = NormalizeIntensityd(IMAGE, nonzero=True, channel_wise=True)
    kinds = {is_ct(name) for name in channel_names}
    if kinds == {True}:
        return [ct_mapping]
    if kinds == {False}:
        return [z_score]
    channel_keys = [f"{IMAGE}_{c}" for c in range(len(channel_names))]
    ct_keys = [k for k, name in zip(channel_keys, channel_names) if is_ct(name)]
    other_keys = [k for k, name in zip(channel_keys, channel_names) if not is_ct(name)]
    return [
        SplitDimd(IMAGE, output_postfixes=[str(c) for c in range(len(channel_names))], dim=0, keepdim=True),
        ScaleIntensityRanged(ct_keys, *ct_window, b_min=-1.0, b_max=1.0, clip=True),
        NormalizeIntensityd(other_keys, nonzero=True, channel_wise=True),
        ConcatItemsd(channel_keys, name=IMAGE, dim=0),
        DeleteItemsd(channel_keys),
    ]


def preprocessing_transforms(
    channel_names: Sequence[str],
    spacing: Sequence[float] | None,
    ct_window: tuple[float, float] = CT_WINDOW,
) -> list[MapTransform]:
    """Load, reorient to RAS, resample to ``spacing`` mm (``None``: keep each case's own) and normalise.

    A missing ``label`` key is allowed (unlabelled test cases).
    """
    transforms: list[MapTransform] = [
        LoadImaged(KEYS, ensure_channel_first=True, image_only=True, allow_missing_keys=True),
        Orientationd(KEYS, axcodes="RAS", labels=None, allow_missing_keys=True),
    ]
    if spacing is not None:
        transforms.append(Spacingd(KEYS, pixdim=spacing, mode=("bilinear", "nearest"), allow_missing_keys=True))
    return transforms + normalisation_transforms(channel_names, ct_window)


def train_transforms(
    channel_names: Sequence[str],
    roi_size: Sequence[int],
    spacing: Sequence[float] | None,
    num_samples: int = 2,
    pos: float = 1.0,
    neg: float = 1.0,
    rotate_deg: float = 15.0,
    rotate_prob: float = 0.5,
    flip_prob: float = 0.5,
    ct_window: tuple[float, float] = CT_WINDOW,
) -> Compose:
    """Preprocessing, then ``num_samples`` random ``roi_size`` patches per case with augmentation.

    Volumes smaller than ``roi_size`` are zero-padded (zero is the mean after z-scoring).
    Patches are centred on foreground with probability ``pos / (pos + neg)``, then rotated by up
    to ``rotate_deg`` about each axis (probability ``rotate_prob``) and flipped along each axis
    (probability ``flip_prob`` each). Output: ``image`` (C, *roi_size) and ``label`` (1, *roi_size)
    float32 tensors.
    """
    angle = torch.pi * rotate_deg / 180.0
    return Compose(
        [
            *preprocessing_transforms(channel_names, spacing, ct_window),
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


def eval_transforms(
    channel_names: Sequence[str],
    spacing: Sequence[float] | None,
    ct_window: tuple[float, float] = CT_WINDOW,
) -> Compose:
    """Preprocessing only, whole volumes (sliding-window inference pads them to the ROI itself)."""
    return Compose(
        [
            *preprocessing_transforms(channel_names, spacing, ct_window),
            EnsureTyped(KEYS, dtype=torch.float32, allow_missing_keys=True),
        ]
    )


def make_datasets(
    spec: DatasetSpec,
    roi_size: Sequence[int],
    spacing: Sequence[float] | None,
    cache: bool = True,
    val_fraction: float = 0.2,
    seed: int = 0,
    fold: int = 0,
    num_samples: int = 2,
    num_workers: int = 0,
) -> tuple[Dataset, Dataset]:
    """Training and validation MONAI datasets of ``spec`` (split by :func:`split_cases`).

    With ``cache`` the deterministic preprocessing is done once and kept in memory
    (``CacheDataset``); the random augmentation still runs every epoch.
    """
    train_cases, val_cases = split_cases(spec, val_fraction, seed, fold)
    pairs = (
        ([c.as_dict() for c in train_cases], train_transforms(spec.channel_names, roi_size, spacing, num_samples)),
        ([c.as_dict() for c in val_cases], eval_transforms(spec.channel_names, spacing)),
    )
    if cache:
        return tuple(
            CacheDataset(data, transform, num_workers=num_workers, progress=False) for data, transform in pairs
        )
    return tuple(Dataset(data, transform) for data, transform in pairs)
