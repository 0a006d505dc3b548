"""Built-in synthetic PET/CT-like lesion segmentation dataset, written as an nnU-Net v2 raw folder.

Each scan is a cartoon torso drawn from a seed in normalised coordinates ``[-1, 1]`` per axis, so
any volume shape holds the whole anatomy:

* CT channel (HU, ``int16``): air, subcutaneous and visceral fat, muscle, lungs with vessels, a
  contrast-enhanced liver, spleen, kidneys and heart, a water-density bladder, spine and pelvis,
  bowel gas; tissue texture, partial-volume blur and noise.
* PET channel (SUV-like, ``float32``): lesions take up tracer, and so do kidneys, bladder,
  myocardium and patches of bowel, at overlapping levels, so PET alone cannot tell lesions from
  normal uptake. Lesions sit in muscle, liver or spleen with little or no CT contrast, so CT alone
  cannot find them either; the hot normal organs are the ones CT shows by shape and density.
  Blurred with a 7 mm FWHM point spread and correlated, count-dependent noise.
* Label (``uint8``): 1-6 irregular lesions per scan, radii 3.5-18 % of the half field of view
  (about 3-20 mm, i.e. a dozen to a few thousand voxels, at the default size).

Scans differ in body size, organ positions and sizes, uptake, noise, PET calibration and CT offset;
they are stored in scanner-like orientations (RAS, LPS, LAS, RPI) with a small rotation and a
random origin, at anisotropic spacing (default 2 x 2 x 3 mm). Everything is drawn from
``numpy.random.default_rng([seed, subset, index])``, so arrays are byte-identical for a seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from veloxseg.data.datasets import (
    SPLITS_FILE, kfold_splits, new_dataset_folder, write_dataset_json, write_nnunet_case,
)  # fmt: skip

GENERATOR_VERSION = "1.0.0"
DATASET_NAME = "VeloxSegSyntheticPETCT"  # dataset.json's name
CHANNEL_NAMES = ("CT", "PET")
LABELS = {"background": 0, "lesion": 1}
DEFAULT_SHAPE = (96, 96, 64)
DEFAULT_SPACING = (2.0, 2.0, 3.0)
PET_FWHM_MM = 7.0
STORAGE_ORIENTATIONS = ("RAS", "LPS", "LAS", "RPI")

# Tissue classes of the anatomy map; lesions are placed in _LESION_SITES only.
AIR, FAT, MUSCLE, LUNG, BLOOD, MYOCARDIUM, LIVER, SPLEEN = range(8)
KIDNEY, RENAL_PELVIS, BLADDER, BONE, MARROW, DISC, GAS, BOWEL = range(8, 16)
_LESION_SITES = (MUSCLE, LIVER, SPLEEN)


@dataclass(frozen=True)
class DemoCase:
    """One synthetic scan as stored on disk: arrays of shape (X, Y, Z) in ``affine``'s voxel order."""

    ct: np.ndarray
    """(X, Y, Z) int16, Hounsfield-like units."""
    pet: np.ndarray
    """(X, Y, Z) float32, SUV-like units."""
    label: np.ndarray
    """(X, Y, Z) uint8, 1 = lesion."""
    affine: np.ndarray
    """(4, 4) voxel -> world (mm, RAS+) transform."""

    def to_nifti(self) -> tuple[list[nib.Nifti1Image], nib.Nifti1Image]:
        """``([CT, PET], label)`` NIfTI images sharing ``affine``, with units set to mm."""
        images = []
        for array in (self.ct, self.pet, self.label):
            image = nib.Nifti1Image(array, self.affine)
            image.header.set_xyzt_units("mm", "sec")
            images.append(image)
        return images[:2], images[2]


def generate_case(
    seed: int,
    index: int,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    test: bool = False,
) -> DemoCase:
    """Draw scan ``index`` of the training (or ``test``) set of ``seed``; independent of the other scans."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 24:
        raise ValueError(f"shape must be 3 sizes of at least 24 voxels, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive sizes in mm, got {tuple(spacing)}")
    rng = np.random.default_rng([seed, int(test), index])
    grid = tuple(
        np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([n if axis == a else 1 for a in range(3)])
        for axis, n in enumerate(shape)
    )
    tissue = _anatomy(rng, grid, shape)
    ct_values, pet_values = _tissue_values(rng)
    ct, pet = ct_values[tissue], pet_values[tissue]
    label = _add_lesions(rng, tissue, ct, pet)
    ct, pet = _acquire(rng, ct, pet, tissue != AIR, np.asarray(spacing, dtype=float))
    arrays, affine = _scanner_storage(rng, [ct, pet, label], spacing)
    return DemoCase(*arrays, affine)


def make_demo_dataset(
    out_dir: str | Path,
    num_train: int = 24,
    num_test: int = 8,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
) -> Path:
    """Write the synthetic dataset to ``out_dir`` as an nnU-Net v2 raw folder and return its path.

    Writes ``dataset.json``, ``imagesTr/case_XXXX_000{0,1}.nii.gz`` (CT, PET),
    ``labelsTr/case_XXXX.nii.gz``, ``imagesTs``/``labelsTs`` (``test_XXXX``), a 5-fold
    ``splits_final.json`` (fewer folds when ``num_train < 5``) and a ``README.md`` card.
    """
    if num_train < 2 or num_test < 0:
        raise ValueError(f"need num_train >= 2 and num_test >= 0, got {num_train} and {num_test}")
    with new_dataset_folder(out_dir, DATASET_NAME) as out:
        for subset, count, prefix in (("Tr", num_train, "case"), ("Ts", num_test, "test")):
            for index in range(count):
                images, label = generate_case(seed, index, shape, spacing, test=subset == "Ts").to_nifti()
                write_nnunet_case(out, f"{prefix}_{index:04d}", images, label, subset)
        write_dataset_json(
            out,
            CHANNEL_NAMES,
            LABELS,
            num_train,
            name=DATASET_NAME,
            description="Synthetic PET/CT-like lesion segmentation (no patient data)",
            reference="veloxseg.data.demo",
            release=GENERATOR_VERSION,
            seed=seed,
        )
        train_ids = [f"case_{i:04d}" for i in range(num_train)]
        splits = kfold_splits(train_ids, num_folds=min(5, num_train), seed=seed)
        (out / SPLITS_FILE).write_text(json.dumps(splits, indent=2) + "\n")
        (out / "README.md").write_text(_card(num_train, num_test, seed, shape, spacing))
    return Path(out_dir)


def add_demo_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``demo-data`` on a ``veloxseg`` CLI; its handler is ``args.func(args) -> exit code``."""
    parser = subparsers.add_parser(
        "demo-data", help="write the synthetic PET/CT demo dataset", description=_add_arguments.__doc__
    )
    _add_arguments(parser)
    parser.set_defaults(func=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``veloxseg demo-data OUT_DIR [--seed N] [--num-train N] [--num-test N] [--shape X Y Z] [--spacing SX SY SZ]``."""
    parser = argparse.ArgumentParser(prog="veloxseg demo-data", description=_add_arguments.__doc__)
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    """Write the synthetic multimodal (CT + PET) lesion dataset as an nnU-Net v2 raw folder."""
    parser.add_argument("out_dir", type=Path, help="folder to create (new or empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--num-train", type=int, default=24, help="training cases (default 24)")
    parser.add_argument("--num-test", type=int, default=8, help="test cases (default 8)")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=DEFAULT_SHAPE, metavar=("X", "Y", "Z"), help="voxels per axis"
    )
    parser.add_argument(
        "--spacing", type=float, nargs=3, default=DEFAULT_SPACING, metavar=("SX", "SY", "SZ"), help="voxel size in mm"
    )


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        out = make_demo_dataset(args.out_dir, args.num_train, args.num_test, args.seed, args.shape, args.spacing)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"wrote {args.num_train} training and {args.num_test} test cases to {out} in {seconds:.1f} s")
    return 0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise of ``shape`` (float32), scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / field.std()


def _ellipsoid(
    grid: tuple[np.ndarray, ...], centre: Sequence[float], radii: Sequence[float], wobble: np.ndarray | float = 0.0
) -> np.ndarray:
    """Boolean (X, Y, Z) ellipsoid in normalised coordinates; ``wobble`` roughens its outline."""
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    return r2 + wobble < 1.0


def _anatomy(rng: np.random.Generator, grid: tuple[np.ndarray, ...], shape: tuple[int, ...]) -> np.ndarray:
    """(X, Y, Z) uint8 map of tissue classes of a torso, axes pointing to patient Right, Anterior, Superior."""
    u, v, w = grid

    def jitter(scale: float = 0.04) -> float:
        return rng.uniform(-scale, scale)

    bumps = _smooth_noise(rng, shape, min(shape) / 12)
    fine = _smooth_noise(rng, shape, 1.5)
    width, depth = rng.uniform(0.78, 0.92), rng.uniform(0.6, 0.72)
    taper = 1.0 + 0.06 * np.sin(np.pi * (w + rng.uniform(-1, 1)))
    body_r2 = (u / (width * taper)) ** 2 + ((v + 0.05) / (depth * taper)) ** 2 + 0.04 * bumps

    tissue = np.full(shape, AIR, dtype=np.uint8)
    tissue[body_r2 < 1.0] = FAT
    inside = body_r2 < rng.uniform(0.72, 0.85)
    tissue[inside] = MUSCLE
    tissue[inside & (w < 0.3) & (_smooth_noise(rng, shape, 2.5) > 0.9)] = FAT  # visceral fat
    bowel_region = inside & (w > -0.65) & (w < 0.05) & (np.abs(u) < 0.6 * width) & (v > -0.3 * depth)
    tissue[bowel_region & (fine > 2.0)] = GAS
    tissue[bowel_region & (_smooth_noise(rng, shape, 2.0) > 1.6) & (tissue == MUSCLE)] = BOWEL

    for side in (-1, 1):
        lung_centre = (side * 0.42 * width, -0.02, 0.74 + jitter())
        tissue[_ellipsoid(grid, lung_centre, (0.3 * width, 0.55 * depth, 0.5), 0.1 * bumps) & inside] = LUNG
    heart_centre = (-0.15 * width + jitter(), 0.15 * depth + jitter(), 0.42 + jitter())
    heart_radii = np.array([0.2 * width, 0.27 * depth, 0.16]) * rng.uniform(0.85, 1.15)
    tissue[_ellipsoid(grid, heart_centre, heart_radii + 0.05)] = MYOCARDIUM
    tissue[_ellipsoid(grid, heart_centre, heart_radii)] = BLOOD
    liver_radii = np.array([0.45 * width, 0.6 * depth, 0.26]) * rng.uniform(0.85, 1.15)
    liver = _ellipsoid(grid, (0.35 * width + jitter(), 0.05 * depth, 0.1 + jitter()), liver_radii, 0.2 * bumps)
    tissue[liver & inside] = LIVER
    spleen_centre = (-0.55 * width + jitter(), -0.2 * depth + jitter(), 0.15 + jitter())
    tissue[_ellipsoid(grid, spleen_centre, (0.15 * width, 0.25 * depth, 0.14), 0.2 * bumps) & inside] = SPLEEN
    for side in (-1, 1):
        centre = (side * 0.4 * width + jitter(), -0.5 * depth + jitter(), -0.08 + jitter(0.08))
        radii = np.array([0.13 * width, 0.2 * depth, 0.2]) * rng.uniform(0.85, 1.15)
        tissue[_ellipsoid(grid, centre, radii, 0.1 * bumps)] = KIDNEY
        tissue[_ellipsoid(grid, centre, radii * 0.5)] = RENAL_PELVIS
    bladder_radii = np.array([0.25 * width, 0.3 * depth, 0.15]) * rng.uniform(0.7, 1.2)
    bladder_centre = (jitter(), 0.25 * depth + jitter(), -0.78 + jitter())
    tissue[_ellipsoid(grid, bladder_centre, bladder_radii, 0.1 * bumps)] = BLADDER

    spine_r2 = (u / (0.09 * width)) ** 2 + ((v + 0.6 * depth) / (0.13 * depth)) ** 2
    disc = np.broadcast_to(((w + rng.uniform(0, 1)) * 4.0) % 1.0 < 0.18, shape)
    tissue[(spine_r2 < 1.0) & ~disc] = BONE
    tissue[(spine_r2 < 0.55) & ~disc] = MARROW
    tissue[(spine_r2 < 1.0) & disc] = DISC
    for side in (-1, 1):
        centre, radii = (side * 0.55 * width, -0.25 * depth, -0.75), np.array([0.2 * width, 0.3 * depth, 0.3])
        tissue[_ellipsoid(grid, centre, radii) & ~_ellipsoid(grid, centre, radii * 0.75) & inside] = BONE
    return tissue


def _tissue_values(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-scan CT (HU) and PET (SUV) values of each tissue class, indexed by class."""
    ct, pet = np.zeros(16, dtype=np.float32), np.zeros(16, dtype=np.float32)
    liver_suv = rng.uniform(1.8, 2.8)
    kidney_suv = rng.uniform(4.0, 10.0)
    for cls, hu, suv in (
        (AIR, -1000, 0.0),
        (FAT, -100, 0.4),
        (MUSCLE, 50, 0.9),
        (LUNG, -850, 0.35),
        (BLOOD, rng.uniform(150, 190), 1.6),
        (MYOCARDIUM, rng.uniform(100, 125), rng.uniform(1.5, 12.0)),
        (LIVER, rng.uniform(90, 115), liver_suv),
        (SPLEEN, rng.uniform(100, 120), 0.85 * liver_suv),
        (KIDNEY, rng.uniform(160, 210), kidney_suv),
        (RENAL_PELVIS, rng.uniform(110, 150), 1.5 * kidney_suv),
        (BLADDER, rng.uniform(0, 15), rng.uniform(15.0, 40.0)),
        (BONE, rng.uniform(500, 800), 1.0),
        (MARROW, rng.uniform(180, 280), 1.4),
        (DISC, 80, 0.8),
        (GAS, -900, 0.3),
        (BOWEL, 40, rng.uniform(1.5, 3.5)),
    ):
        ct[cls], pet[cls] = hu, suv
    return ct, pet


def _add_lesions(rng: np.random.Generator, tissue: np.ndarray, ct: np.ndarray, pet: np.ndarray) -> np.ndarray:
    """Paint 1-6 irregular lesions into ``ct``/``pet`` (in place) and return their (X, Y, Z) uint8 mask."""
    shape = tissue.shape
    step = 2.0 / (np.asarray(shape) - 1)  # voxel size in normalised units
    site = np.isin(tissue, _LESION_SITES)
    depth = ndimage.distance_transform_edt(site, sampling=step)
    label = np.zeros(shape, dtype=np.uint8)
    for _ in range(rng.integers(1, 7)):
        radii = np.exp(rng.uniform(np.log(0.035), np.log(0.18))) * rng.uniform(0.75, 1.3, size=3)
        candidates = np.flatnonzero(depth >= min(radii.mean(), 0.5 * depth.max()))
        centre = np.array(np.unravel_index(rng.choice(candidates), shape))
        half = np.ceil(1.5 * radii / step).astype(int)
        lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        local = np.ogrid[box]
        r2 = sum(((g - c) * s / r) ** 2 for g, c, s, r in zip(local, centre, step, radii))
        sigma = max(0.8, 0.4 * float(np.min(radii / step)))
        outline = r2 + rng.uniform(0.2, 0.6) * _smooth_noise(rng, r2.shape, sigma) < 1.0
        outline[tuple(centre - lo)] = True
        pieces, _ = ndimage.label(outline & site[box])
        lesion = pieces == pieces[tuple(centre - lo)]  # one connected lesion
        core = lesion & (r2 < 0.3) if radii.mean() > 0.1 else np.zeros_like(lesion)  # necrotic centre
        ct[box][lesion] += rng.uniform(-25.0, 10.0)
        uptake = rng.uniform(2.5, 12.0) * np.where(core, rng.uniform(0.3, 0.6), 1.0)
        pet[box][lesion] = np.maximum(pet[box][lesion], uptake[lesion])
        label[box][lesion] = 1
    return label


def _acquire(
    rng: np.random.Generator, ct: np.ndarray, pet: np.ndarray, body: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Scanner effects: texture, partial-volume blur, noise, calibration; returns int16 CT and float32 PET."""
    shape = ct.shape
    ct = ct + body * rng.uniform(5.0, 10.0) * _smooth_noise(rng, shape, 1.2)
    ct = ndimage.gaussian_filter(ct, 0.6) + rng.normal(0.0, 4.0)
    ct += rng.uniform(10.0, 25.0) * rng.standard_normal(shape, dtype=np.float32)
    ct = np.clip(np.round(ct), -1024, 3071).astype(np.int16)
    pet = ndimage.gaussian_filter(pet * rng.uniform(0.75, 1.3), PET_FWHM_MM / 2.355 / spacing)
    noise = _smooth_noise(rng, shape, 0.8) * rng.uniform(0.15, 0.3) * np.sqrt(np.maximum(pet, 0.0))
    return ct, np.maximum(pet + noise, 0.0).astype(np.float32)


def _scanner_storage(
    rng: np.random.Generator, arrays: list[np.ndarray], spacing: Sequence[float]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Store RAS-ordered arrays in a random scanner orientation; a small rotation about S and an offset origin."""
    shape = np.asarray(arrays[0].shape)
    angle = np.deg2rad(rng.uniform(-8.0, 8.0))
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    linear = rotation @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ (shape - 1) / 2 + rng.uniform(-50.0, 50.0, size=3)
    codes = STORAGE_ORIENTATIONS[rng.integers(len(STORAGE_ORIENTATIONS))]
    transform = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(codes)
    )
    stored = [np.ascontiguousarray(nib.orientations.apply_orientation(a, transform)) for a in arrays]
    return stored, affine @ nib.orientations.inv_ornt_aff(transform, shape)


def _card(num_train: int, num_test: int, seed: int, shape: Sequence[int], spacing: Sequence[float]) -> str:
    """Markdown description of a generated folder."""
    shape_args, spacing_args = " ".join(map(str, shape)), " ".join(f"{s:g}" for s in spacing)
    return f"""# VeloxSeg synthetic PET/CT lesion dataset

**Synthetic data.** Every image here was drawn by a random generator (`veloxseg.data.demo`,
generator version {GENERATOR_VERSION}, seed {seed}). It contains no patient data and is not a
medical image: it is a cartoon made for demos, smoke tests and CPU training examples. Scores on it
say nothing about performance on real scans. Regenerate it with

```
veloxseg demo-data OUT_DIR --seed {seed} --num-train {num_train} --num-test {num_test} \\
    --shape {shape_args} --spacing {spacing_args}
```

## Contents

- Layout: nnU-Net v2 raw folder. Training cases in `imagesTr` + `labelsTr`: {num_train}; test cases
  in `imagesTs` + `labelsTs`: {num_test} (test labels kept apart for evaluation). `splits_final.json`: nnU-Net-style
  train/validation folds.
- Channels: `_0000` CT (HU-like, int16), `_0001` PET (SUV-like, float32).
- Labels: 0 background, 1 lesion.
- Geometry: {" x ".join(map(str, shape))} voxels of {" x ".join(f"{s:g}" for s in spacing)} mm, stored in varying
  orientations (RAS, LPS, LAS, RPI) with a small rotation and offset origins.

## How it is made

A torso (fat, muscle, lungs, heart, liver, spleen, kidneys, bladder, spine, pelvis, bowel) is
drawn from ellipsoids with roughened outlines. Lesions (1-6 per scan, irregular, radii 3.5-18 % of
the half field of view) sit in muscle, liver or spleen with little or no CT contrast
and take up tracer; kidneys, bladder, myocardium and bowel patches take up tracer too, at
overlapping levels. Neither channel alone separates lesions from normal uptake; the hot normal
organs are recognisable on CT by shape and density. PET is blurred ({PET_FWHM_MM:g} mm FWHM) with
count-dependent noise; CT has texture, partial-volume blur and noise. Calibration, noise and
anatomy vary from scan to scan. Lesions are a small fraction of the voxels (strong class imbalance).

## Known limitations

Anatomy and physics are simplified: no head or limbs, no breathing or motion artefacts,
no metal, idealised organ shapes, PET noise is not a reconstruction model.
"""
