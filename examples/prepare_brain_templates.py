"""Prepare a small real-image task: grey / white matter segmentation of the MNI ICBM 2009 T1 template.

The template and its tissue probability maps ship inside the nilearn wheel, so nothing is
downloaded. nilearn is an optional extra: ``pip install "veloxseg[demo]"`` (or ``pip install nilearn``).

Labels: 0 rest, 1 grey matter, 2 white matter (the larger of the two probabilities, where it is at
least ``--threshold``). There is one template, so the cases are random deformations of it
(rotation, scaling, shear, shift) with random intensity changes (gain, gamma, bias field, noise),
drawn from ``--seed``. They are written as an nnU-Net v2 raw folder with a notice on the
template's origin and copyright. Usage::

    python examples/prepare_brain_templates.py OUT_DIR [--num-train 8] [--num-test 2] [--seed 0] [--resolution 3]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import RandAdjustContrast, RandAffine, RandBiasField, RandGaussianNoise

from veloxseg.data.datasets import write_dataset_json, write_nnunet_case

CHANNEL_NAMES = ("T1",)
LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}
NOTICE = """\
Images derived from the MNI ICBM 2009a nonlinear symmetric T1 template and its grey / white
matter probability maps (files mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz as shipped in
nilearn {nilearn_version}, rescaled and resampled by nilearn to {resolution} mm).

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University. The templates' notice allows use, copying, modification and
distribution for any purpose without fee, provided the copyright notice is kept with all copies;
they are provided as is, without warranty. Full notice and the original files:
http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009

Please cite:
- V. Fonov, A. Evans, K. Botteron, C. Almli, R. McKinstry, D. Collins, and the Brain Development
  Cooperative Group. Unbiased average age-appropriate atlases for pediatric studies.
  NeuroImage 54(1):313-327, 2011.
- V. Fonov, A. Evans, R. McKinstry, C. Almli, D. Collins. Unbiased nonlinear average
  age-appropriate brain templates from birth to adulthood. NeuroImage 47(S1):S102, 2009.
- D. L. Collins, A. P. Zijdenbos, W. F. C. Baare, A. C. Evans. ANIMAL+INSECT: improved cortical
  structure segmentation. IPMI 1999, LNCS 1613:210-223.

The {num_cases} cases here are random deformations and intensity changes of that single template
(seed {seed}); their labels come from the probability maps, not from manual annotation.
"""


def load_templates(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(3, X, Y, Z) float32 stack [T1, grey matter, white matter] in [0, 1], and its (4, 4) affine."""
    from nilearn import datasets  # optional dependency

    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution)
    wm = datasets.load_mni152_wm_template(resolution=resolution)
    if not (t1.shape == gm.shape == wm.shape and all(np.allclose(t1.affine, i.affine) for i in (gm, wm))):
        raise RuntimeError("nilearn's T1, grey and white matter templates are not on the same grid")
    t1_data, gm_data, wm_data = (img.get_fdata(dtype=np.float32) for img in (t1, gm, wm))
    return np.stack([t1_data, gm_data, wm_data]), t1.affine


def tissue_labels(grey: np.ndarray, white: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(X, Y, Z) uint8 labels: 1 where grey matter is likelier, 2 where white matter is, 0 below ``threshold``."""
    labels = np.where(white > grey, 2, 1).astype(np.uint8)
    labels[np.maximum(grey, white) < threshold] = 0
    return labels


def augment(stack: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random deformation of the (3, X, Y, Z) [T1, GM, WM] stack, then random T1 intensity changes.

    Returns the (X, Y, Z) float32 T1 (arbitrary MR units) and the deformed (2, X, Y, Z) probabilities.
    """
    deform = RandAffine(
        prob=1.0,
        rotate_range=(0.15, 0.15, 0.15),
        scale_range=(0.1, 0.1, 0.1),
        shear_range=(0.05, 0.05, 0.05),
        translate_range=(4, 4, 4),
        mode="bilinear",
        padding_mode="zeros",
    )
    intensity = [
        RandAdjustContrast(prob=1.0, gamma=(0.7, 1.5)),
        RandBiasField(prob=1.0, coeff_range=(0.1, 0.3)),
        RandGaussianNoise(prob=1.0, std=0.03),
    ]
    for transform in (deform, *intensity):
        transform.set_random_state(seed=int(rng.integers(2**31)))
    moved = torch.as_tensor(deform(torch.from_numpy(stack))).numpy()
    t1 = torch.from_numpy(moved[:1])
    for transform in intensity:
        t1 = torch.as_tensor(transform(t1))
    gain = rng.uniform(500.0, 1500.0)
    return (np.clip(t1[0].numpy(), 0.0, None) * gain).astype(np.float32), moved[1:]


def prepare(
    out_dir: str | Path,
    num_train: int = 8,
    num_test: int = 2,
    seed: int = 0,
    resolution: int = 3,
    threshold: float = 0.5,
) -> Path:
    """Write the brain tissue task to ``out_dir`` (nnU-Net v2 raw layout) and return its path."""
    import nilearn

    out = Path(out_dir)
    if (out / "dataset.json").exists():
        raise FileExistsError(f"{out} already holds a dataset.json; choose an empty folder")
    stack, affine = load_templates(resolution)
    for subset, count, prefix in (("Tr", num_train, "brain"), ("Ts", num_test, "brain_test")):
        for index in range(count):
            t1, probabilities = augment(stack, np.random.default_rng([seed, int(subset == "Ts"), index]))
            label = tissue_labels(*probabilities, threshold=threshold)
            write_nnunet_case(
                out, f"{prefix}_{index:04d}", [nib.Nifti1Image(t1, affine)], nib.Nifti1Image(label, affine), subset
            )
    write_dataset_json(
        out,
        CHANNEL_NAMES,
        LABELS,
        num_train,
        name="MNI152BrainTissue",
        description="Grey / white matter of augmented copies of the MNI ICBM 2009a template",
        reference="http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009",
        licence="see NOTICE.txt",
    )
    (out / "NOTICE.txt").write_text(
        NOTICE.format(
            nilearn_version=nilearn.__version__, resolution=resolution, num_cases=num_train + num_test, seed=seed
        )
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-train", type=int, default=8)
    parser.add_argument("--num-test", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=3, help="voxel size in mm (default 3: 67 x 79 x 64)")
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum tissue probability (default 0.5)")
    args = parser.parse_args(argv)
    try:
        out = prepare(args.out_dir, args.num_train, args.num_test, args.seed, args.resolution, args.threshold)
    except ImportError:
        parser.error('nilearn is needed: pip install "veloxseg[demo]" (or pip install nilearn)')
    print(f"wrote {args.num_train} training and {args.num_test} test cases to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
