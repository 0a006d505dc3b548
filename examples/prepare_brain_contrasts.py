"""Prepare a multi-contrast brain MRI task: T1-, T2- and FLAIR-like images synthesised from the MNI152
template's tissue maps, for training and measuring models on missing modalities.

Each contrast carries its own information, as in clinical MRI:

* T1-like: white matter brightest, grey matter darker, CSF dark; lesions look like grey matter.
* T2-like: CSF brightest, grey above white matter; lesions bright (but so is CSF).
* FLAIR-like: CSF suppressed, grey and white matter close; lesions brightest.

So grey / white matter are easiest on T1, lesions on FLAIR, and T2 helps with both. Labels: 0 rest,
1 grey matter, 2 white matter, 3 lesion. The tissue maps are the MNI ICBM 2009a grey / white matter
probability maps and brain mask that ship inside the nilearn wheel (``pip install "veloxseg[demo]"``;
nothing is downloaded); CSF is the brain mask less grey and white matter. Every case is a random
deformation of the maps (as in ``prepare_brain_templates.py``) with 3-8 random ellipsoidal lesions in
its white matter; each contrast then gets its own gain, gamma, bias field and noise. The cases are
written as an nnU-Net v2 raw folder (channels T1, T2, FLAIR) with a notice on the template's origin
and copyright. Usage::

    python examples/prepare_brain_contrasts.py OUT_DIR [--num-train 8] [--num-test 2] [--seed 0] [--resolution 3]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import RandAdjustContrast, RandAffine, RandBiasField, RandGaussianNoise
from prepare_brain_templates import MNI152_NOTICE, tissue_labels
from prepare_common import INSTALL_NILEARN, dataset_parser, run

from veloxseg.data.datasets import new_dataset_folder, write_dataset_json, write_nnunet_case

CHANNEL_NAMES = ("T1", "T2", "FLAIR")
LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2, "lesion": 3}
DATASET_NAME = "MNI152BrainContrasts"  # dataset.json's name
# Signal of each tissue (grey matter, white matter, CSF, lesion) in each contrast, before its gain.
CONTRASTS = {
    "T1": (0.55, 0.85, 0.15, 0.5),
    "T2": (0.6, 0.45, 1.0, 0.85),
    "FLAIR": (0.6, 0.5, 0.08, 1.0),
}
NOTICE = (
    MNI152_NOTICE
    + """
The images here are not the T1 template: T1-, T2- and FLAIR-like images are synthesised from the grey /
white matter probability maps and the brain mask of the same release, each tissue given a signal per
contrast; the lesions are random ellipsoids in the white matter, not lesions of any person.
"""
)


def load_tissue_maps(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(3, X, Y, Z) float32 [grey matter, white matter, CSF] probabilities at ``resolution`` mm, and the affine."""
    from nilearn import datasets  # optional dependency

    maps = [
        datasets.load_mni152_gm_template(resolution=resolution),
        datasets.load_mni152_wm_template(resolution=resolution),
        datasets.load_mni152_brain_mask(resolution=resolution),
    ]
    if not all(m.shape == maps[0].shape and np.allclose(m.affine, maps[0].affine) for m in maps):
        raise RuntimeError("nilearn's grey matter, white matter and brain mask templates are not on the same grid")
    gm, wm, brain = (m.get_fdata(dtype=np.float32) for m in maps)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    return np.stack([gm, wm, csf]), maps[0].affine


def add_lesions(tissues: np.ndarray, rng: np.random.Generator, resolution: int) -> np.ndarray:
    """[grey matter, white matter, CSF] (3, X, Y, Z) -> [grey, white, CSF, lesion] (4, X, Y, Z): 3-8
    ellipsoids of 6-14 mm radii centred in white matter replace the white matter they cover."""
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in tissues.shape[1:]), indexing="ij"), -1).astype(np.float32)
    centres = np.argwhere(tissues[1] > 0.9)
    lesion = np.zeros(tissues.shape[1:], dtype=np.float32)
    for _ in range(rng.integers(3, 9)):
        radii = rng.uniform(6.0, 14.0, size=3) / resolution
        inside = (((grid - centres[rng.integers(len(centres))]) / radii) ** 2).sum(-1) <= 1.0
        lesion = np.maximum(lesion, inside * tissues[1])  # lesions stay in white matter
    return np.concatenate([tissues * (1.0 - lesion), lesion[None]])


def synthesise(maps: np.ndarray, rng: np.random.Generator, resolution: int) -> tuple[list[np.ndarray], np.ndarray]:
    """One case from the (3, X, Y, Z) tissue maps: a random deformation, lesions, then each contrast as the
    tissue-weighted sum of its signals with its own gamma, bias field, noise and gain. Returns the three
    (X, Y, Z) float32 images (arbitrary MR units) and the (4, X, Y, Z) tissue probabilities."""
    deform = RandAffine(
        prob=1.0, rotate_range=(0.15,) * 3, scale_range=(0.1,) * 3, shear_range=(0.05,) * 3, translate_range=(4,) * 3,
        mode="bilinear", padding_mode="zeros",
    )  # fmt: skip
    deform.set_random_state(seed=int(rng.integers(2**31)))
    tissues = add_lesions(torch.as_tensor(deform(torch.from_numpy(maps))).numpy(), rng, resolution)
    images = []
    for signals in CONTRASTS.values():
        image = torch.from_numpy(np.tensordot(np.asarray(signals, dtype=np.float32), tissues, axes=1)[None])
        for transform in (
            RandAdjustContrast(prob=1.0, gamma=(0.8, 1.25)),
            RandBiasField(prob=1.0, coeff_range=(0.1, 0.3)),
            RandGaussianNoise(prob=1.0, std=0.04),
        ):
            transform.set_random_state(seed=int(rng.integers(2**31)))
            image = torch.as_tensor(transform(image))
        gain = rng.uniform(500.0, 1500.0)
        images.append((np.clip(image[0].numpy(), 0.0, None) * gain).astype(np.float32))
    return images, tissues


def case_labels(tissues: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(X, Y, Z) uint8 labels: lesion (3) where its probability is at least 0.5, else grey / white matter
    by :func:`prepare_brain_templates.tissue_labels` (CSF and outside the brain: 0)."""
    labels = tissue_labels(tissues[:2], threshold)
    labels[tissues[3] >= 0.5] = LABELS["lesion"]
    return labels


def prepare(
    out_dir: str | Path, num_train: int = 8, num_test: int = 2, seed: int = 0, resolution: int = 3,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write the task to ``out_dir`` (nnU-Net v2 raw layout) and return its path; ``overwrite``: replace a
    folder of this task written before (any other non-empty folder is refused)."""
    with new_dataset_folder(out_dir, DATASET_NAME, overwrite) as out:
        maps, affine = load_tissue_maps(resolution)
        import nilearn

        for subset, count, prefix in (("Tr", num_train, "brain"), ("Ts", num_test, "brain_test")):
            for index in range(count):
                rng = np.random.default_rng([seed, int(subset == "Ts"), index])
                images, tissues = synthesise(maps, rng, resolution)
                write_nnunet_case(
                    out, f"{prefix}_{index:04d}", [nib.Nifti1Image(image, affine) for image in images],
                    nib.Nifti1Image(case_labels(tissues), affine), subset,
                )  # fmt: skip
        write_dataset_json(
            out, CHANNEL_NAMES, LABELS, num_train, name=DATASET_NAME,
            description="Grey / white matter and synthetic lesions from T1-, T2- and FLAIR-like contrasts synthesised "
            "from the MNI ICBM 2009a tissue maps",
            reference="http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009", licence="see NOTICE.txt",
        )  # fmt: skip
        details = {"resolution": resolution, "num_cases": num_train + num_test, "seed": seed}
        (out / "NOTICE.txt").write_text(NOTICE.format(nilearn_version=nilearn.__version__, **details))
    return Path(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    return run(
        dataset_parser(__doc__), argv,
        lambda args: prepare(args.out_dir, args.num_train, args.num_test, args.seed, args.resolution, args.overwrite),
        f"the MNI152 tissue maps need nilearn: {INSTALL_NILEARN}",
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
