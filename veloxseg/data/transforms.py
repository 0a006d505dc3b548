"""The one preprocessing of VeloxSeg: MONAI dictionary transforms built from a model's metadata.

Training, validation and ``veloxseg predict`` all run :func:`preprocessing_transforms` of the same
:class:`~veloxseg.metadata.ModelMetadata`: reorient to its ``orientation``, resample to its ``spacing``
(bilinear images, nearest labels) and normalise each channel as its :class:`ChannelInfo` says. The
trainer chooses the channels' normalisation (:func:`channel_infos`) and saves that metadata with the
model, so inference normalises with exactly the parameters training used.

Training also augments the raw intensities of every "foreground_zscore" (MR-like) channel before
normalising it (:func:`intensity_augmentation`): its background is randomly set to exact zeros,
noised or kept, so that a skull-stripped scan and a scan with a noisy background are both in the
training distribution; ``domain_randomisation`` adds SynthSeg-style per-tissue contrast, gamma, bias
field, resolution and noise changes (Billot et al., MedIA 2023).

Cases are ``{"image": [paths, one per channel], "label": path}``: per-channel files are stacked into
one (C, X, Y, Z) ``image`` by ``LoadImaged``; a single 4-D file (MSD layout) is loaded with its
channels moved first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, MetaTensor
from monai.transforms import (
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandRotated,
    RandSimulateLowResolutiond,
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
# "foreground_zscore": the foreground is every voxel above this share of the scan's 99.5th percentile.
# Well below grey and white matter in any T1/T2/FLAIR, well above the noise of an MR background.
FOREGROUND_SHARE, FOREGROUND_PERCENTILE = 0.1, 99.5
PERCENTILE_SAMPLE = 1 << 22  # voxels read for the percentile (a strided subsample of larger scans)


def is_ct(channel_name: str) -> bool:
    """Whether a ``dataset.json`` channel name denotes CT (normalised with a fixed HU window)."""
    return channel_name.strip().upper() == "CT"


def is_pet(channel_name: str) -> bool:
    """Whether a ``dataset.json`` channel name denotes PET (z-scored over its nonzero voxels)."""
    return "PET" in channel_name.strip().upper()


def channel_infos(channel_names: Sequence[str]) -> list[ChannelInfo]:
    """How the trainer normalises a dataset's channels, one modality group per channel.

    CT channels are clipped to ``CT_WINDOW`` (HU) and mapped linearly to [-1, 1] ("ct" with the
    window's centre as ``mean`` and its half-width as ``std``): a fixed mapping rather than a per-scan
    z-score, so a density means the same in every scan. PET channels are z-scored over their nonzero
    voxels ("zscore"). Every other channel (MR: T1, T2, FLAIR, ADC, ...) is z-scored over its
    foreground ("foreground_zscore", :class:`ForegroundZScored`), so that the same anatomy gets the same
    values whether the scan's background is exact zeros (skull-stripped), noise or cropped away.
    """
    lo, hi = CT_WINDOW
    ct = {"normalisation": "ct", "clip": CT_WINDOW, "mean": (lo + hi) / 2, "std": (hi - lo) / 2}

    def info(group: int, name: str) -> ChannelInfo:
        if is_ct(name):
            return ChannelInfo(name, group, **ct)
        return ChannelInfo(name, group, "zscore" if is_pet(name) else "foreground_zscore")

    return [info(group, name) for group, name in enumerate(channel_names)]


def foreground_threshold(image: torch.Tensor) -> float:
    """The intensity above which a voxel of ``image`` (any shape) is foreground:
    ``FOREGROUND_SHARE`` of its ``FOREGROUND_PERCENTILE``th percentile (0.0 when that is not positive)."""
    flat = (image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)).reshape(-1).float()
    if flat.numel() > PERCENTILE_SAMPLE:
        flat = flat[:: flat.numel() // PERCENTILE_SAMPLE + 1]
    high = float(np.percentile(flat.cpu().numpy(), FOREGROUND_PERCENTILE))
    return FOREGROUND_SHARE * high if high > 0 else 0.0


class ForegroundZScored(MapTransform):
    """Z-score each ``keys`` item (1, X, Y, Z) with the mean and std of its foreground voxels
    (:func:`foreground_threshold`), applied to every voxel.

    Written here because MONAI's NormalizeIntensity takes its statistics over all or over the nonzero
    voxels only: with the nonzero voxels, zeroing or noising a scan's background moves every value.
    A scan without foreground (e.g. all zeros) is left as it is.
    """

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            foreground = image[image > foreground_threshold(image)]
            if foreground.numel() > 1:
                std = float(foreground.std())
                d[key] = (image - float(foreground.mean())) / (std if std > 0 else 1.0)
        return d


class RandBackgroundd(Randomizable, MapTransform):
    """The background of each ``keys`` item (1, X, Y, Z): voxels at or below
    :func:`foreground_threshold` set to exact zeros, or given magnitude noise (|N(0, s)| with ``s`` up to
    ``noise_share`` of the 99.5th percentile), or kept, with equal probability. A skull-stripped scan
    and one with a noisy background then both look like training data."""

    def __init__(self, keys: Sequence[str] | str, noise_share: float = 0.04) -> None:
        MapTransform.__init__(self, keys)
        self.noise_share = noise_share

    def randomize(self, data: None = None) -> None:
        self._mode = int(self.R.randint(3))  # 0 zeros, 1 noise, 2 kept
        self._share = self.R.uniform(0.005, self.noise_share)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            if self._mode == 2:
                continue
            image = torch.as_tensor(d[key]).clone()
            threshold = foreground_threshold(image)
            background = image <= threshold
            if self._mode == 0:
                image[background] = 0.0
            else:
                scale = self._share * threshold / FOREGROUND_SHARE
                noise = torch.from_numpy(np.abs(self.R.normal(0.0, scale, int(background.sum())))).to(image.dtype)
                image[background] = noise
            d[key] = image
        return d


class RandTissueContrastd(Randomizable, MapTransform):
    """Each labelled tissue of ``keys`` items (1, X, Y, Z) scaled by its own random factor in
    [1 - ``spread``, 1 + ``spread``] (``label_key``: the (1, X, Y, Z) label map), with probability ``prob``:
    SynthSeg's random per-label intensities, applied to the real image so its texture stays."""

    def __init__(self, keys: Sequence[str] | str, label_key: str, spread: float = 0.2, prob: float = 0.5) -> None:
        MapTransform.__init__(self, keys)
        self.label_key, self.spread, self.prob = label_key, spread, prob

    def randomize(self, data: None = None) -> None:
        self._do = self.R.random() < self.prob
        self._factors = self.R.uniform(1 - self.spread, 1 + self.spread, 256)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do or self.label_key not in d:  # unlabelled (pretraining) scans keep their contrast
            return d
        label = torch.as_tensor(d[self.label_key]).long().clamp(0, 255)
        for key in self.key_iterator(d):
            factors = torch.as_tensor(self._factors, dtype=torch.float32)[label]
            d[key] = d[key] * factors
        return d


def channel_normalisation(key: str, info: ChannelInfo) -> list[MapTransform]:
    """The transforms normalising the one-channel item ``key`` (1, X, Y, Z) as ``info`` says.

    "ct": ``(clip(x, *info.clip) - info.mean) / info.std``; "zscore": z-score over this scan's nonzero
    voxels (zero voxels stay 0); "foreground_zscore": z-score over its foreground (:class:`ForegroundZScored`);
    "none": nothing.
    """
    if info.normalisation == "ct":
        if info.clip is None:
            return [NormalizeIntensityd(key, subtrahend=info.mean, divisor=info.std)]
        lo, hi = info.clip  # clip and map linearly: lo -> (lo - mean) / std, hi -> (hi - mean) / std
        b_min, b_max = (lo - info.mean) / info.std, (hi - info.mean) / info.std
        return [ScaleIntensityRanged(key, lo, hi, b_min=b_min, b_max=b_max, clip=True)]
    if info.normalisation == "zscore":
        return [NormalizeIntensityd(key, nonzero=True, channel_wise=True)]
    if info.normalisation == "foreground_zscore":
        return [ForegroundZScored(key)]
    return []  # "none" (ChannelInfo accepts no other normalisation)


def intensity_augmentation(key: str, info: ChannelInfo, domain_randomisation: bool = False) -> list[MapTransform]:
    """Training's random intensity changes of the one-channel item ``key`` (1, X, Y, Z), before
    normalisation; only "foreground_zscore" (MR-like) channels are augmented.

    Always: :class:`RandBackgroundd`. With ``domain_randomisation`` (for models meant to work on scans
    from other sources), first SynthSeg-style changes: per-tissue contrast, gamma 0.5-2, a bias field,
    a lower acquisition resolution (down to half) and blur.
    """
    if info.normalisation != "foreground_zscore":
        return []
    if not domain_randomisation:
        return [RandBackgroundd(key)]
    return [
        RandTissueContrastd(key, LABEL, spread=0.25, prob=0.5),
        RandAdjustContrastd(key, prob=0.5, gamma=(0.5, 2.0)),
        RandBiasFieldd(key, prob=0.5, coeff_range=(0.1, 0.5)),
        RandSimulateLowResolutiond(key, prob=0.3, zoom_range=(0.5, 1.0)),
        RandGaussianSmoothd(key, prob=0.2, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), sigma_z=(0.25, 1.0)),
        RandBackgroundd(key),
    ]


def normalisation_transforms(
    channels: Sequence[ChannelInfo], augment: bool = False, domain_randomisation: bool = False
) -> list[MapTransform]:
    """``image`` (C, X, Y, Z) normalised channel by channel, channel c as ``channels[c]`` says; with
    ``augment``, after :func:`intensity_augmentation` (and random noise of up to 0.1 std after it)."""
    keys = [f"{IMAGE}_{c}" for c in range(len(channels))]
    per_channel = []
    for key, info in zip(keys, channels):
        if augment:
            per_channel += intensity_augmentation(key, info, domain_randomisation)
        per_channel += channel_normalisation(key, info)
        if augment and domain_randomisation and info.normalisation == "foreground_zscore":
            per_channel.append(RandGaussianNoised(key, prob=0.5, std=0.1))
    return [
        SplitDimd(IMAGE, output_postfixes=[str(c) for c in range(len(channels))], dim=0, keepdim=True),
        *per_channel,
        ConcatItemsd(keys, name=IMAGE, dim=0),
        DeleteItemsd(keys),
    ]


def preprocessing_transforms(metadata: ModelMetadata) -> list[MapTransform]:
    """``image`` (C, X, Y, Z) and, when present, ``label`` (1, X, Y, Z), loaded MetaTensors, reoriented
    to ``metadata.orientation``, resampled to ``metadata.spacing`` mm (``None``: kept) and normalised."""
    return spatial_transforms(metadata) + normalisation_transforms(metadata.channels)


def spatial_transforms(metadata: ModelMetadata) -> list[MapTransform]:
    """Reorientation to ``metadata.orientation`` and resampling to ``metadata.spacing`` (bilinear images,
    nearest labels; ``None``: kept), the invertible part of :func:`preprocessing_transforms`."""
    transforms: list[MapTransform] = [
        Orientationd(KEYS, axcodes=metadata.orientation, labels=None, allow_missing_keys=True)
    ]
    if metadata.spacing is not None:
        transforms.append(
            Spacingd(
                KEYS, pixdim=metadata.spacing, mode=("bilinear", "nearest"), dtype=np.float32, allow_missing_keys=True
            )
        )
    return transforms


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
    domain_randomisation: bool = False,
) -> Compose:
    """Load and preprocess a case, then ``num_samples`` random ``roi_size`` patches with augmentation.

    The intensities are augmented before normalisation (:func:`intensity_augmentation`; with
    ``domain_randomisation`` the SynthSeg-style set).
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
            *spatial_transforms(metadata),
            *normalisation_transforms(metadata.channels, augment=True, domain_randomisation=domain_randomisation),
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
