"""Prepare a small real-image brain task from a template that a package ships (nothing is downloaded).

Three tasks (``--template``):

* ``mni152`` (default): grey / white matter of the MNI ICBM 2009a T1 template. The template and its
  tissue probability maps ship inside the nilearn wheel; nilearn is an optional extra:
  ``pip install "veloxseg[demo]"`` (or ``pip install nilearn``). Labels: 0 rest, 1 grey matter,
  2 white matter, the likeliest class where its probability is at least ``--threshold``. With
  ``--labels posterior`` (default) the probabilities are each voxel's posterior under a CSF / grey /
  white Gaussian mixture of the T1's intensities with the maps as priors (:func:`tissue_posteriors`),
  so the grey / white border follows the image; ``--labels maps`` takes the maps as they are (an
  average of many brains, whose grey matter ribbon is wider than the image's).
* ``colin27``: cerebral and cerebellar grey matter of the Colin27 T1 (MNI single subject), the AAL
  atlas drawn on it merged into two classes (AAL regions 1-90 cerebrum, 91-116 cerebellum).
  Both files ship in Debian's mricron-data package (``apt-get install mricron-data``; the files are
  read from ``--mricron-dir``). No VeloxSeg tag is trained on it: it is the held-out task of
  ``benchmarks/finetune.py``.
* ``colin27_deep``: four deep grey matter structures of the same Colin27 T1 and AAL atlas (left and
  right merged): caudate, putamen, thalamus and hippocampus, small structures (at 2 mm a few
  thousand voxels each) beside a large background. Use ``--resolution 2``: at 3 mm the structures
  are a few voxels thick.

There is one image per template, so the cases are random deformations of it (rotation, scaling,
shear, shift) with random intensity changes (gain, gamma, bias field, noise), drawn from ``--seed``.
With ``--synthesise`` (mni152), each case is instead synthesised from the deformed tissue maps at
1 mm, SynthSeg-style (:func:`synthesise`): random tissue borders, so the cortex and the gyral white
matter take shapes the averaged template lacks, random per-tissue intensities, blur and partial volume.
They are written as an nnU-Net v2 raw folder with a notice on the template's origin and copyright.
Usage::

    python examples/prepare_brain_templates.py OUT_DIR [--template mni152|colin27|colin27_deep] [--num-train 8]
        [--num-test 2] [--seed 0] [--resolution 3]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import RandAdjustContrast, RandAffine, RandBiasField, RandGaussianNoise
from scipy import ndimage

from prepare_common import INSTALL_NILEARN, dataset_parser, run

from veloxseg.data.datasets import new_dataset_folder, write_dataset_json, write_nnunet_case

CHANNEL_NAMES = ("T1",)
MRICRON_DIR = Path("/usr/share/mricron/templates")
MNI152_NOTICE = """\
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
"""
MNI152_CASES = """
The {num_cases} cases here are {cases} (seed {seed}); their labels come from
the probability maps ({labels}), not from manual annotation.
"""
COLIN27_NOTICE = """\
Images derived from the Colin27 T1 average (ch2.nii.gz) and the AAL atlas drawn on it
(aal.nii.gz), as shipped in Debian's mricron-data package (MRIcron templates; Debian records the
package under the BSD-3-clause license, copyright Chris Rorden), averaged over {resolution} mm
blocks. {regions}

Please cite:
- C. J. Holmes, R. Hoge, L. Collins, R. Woods, A. W. Toga, A. C. Evans. Enhancement of MR images
  using registration for signal averaging. J Comput Assist Tomogr 22(2):324-333, 1998.
- N. Tzourio-Mazoyer et al. Automated anatomical labeling of activations in SPM using a
  macroscopic anatomical parcellation of the MNI MRI single-subject brain. NeuroImage
  15(1):273-289, 2002.

The {num_cases} cases here are random deformations and intensity changes of that single image
(seed {seed}); their labels come from the atlas, not from annotation of each case.
"""


CASE_SOURCES = {
    False: "random deformations and intensity changes of that single template",
    True: "synthesised from its deformed tissue maps (random tissue borders, intensities, blur and partial volume)",
}
LABEL_SOURCES = {
    "posterior": "each voxel's posterior under a Gaussian mixture of the T1 intensities with the maps as priors",
    "maps": "the maps as they are",
}


@dataclass(frozen=True)
class Template:
    """One template task: its label names, its dataset.json description and reference, and its notice."""

    labels: dict[str, int]
    name: str
    description: str
    reference: str
    notice: str
    aal_regions: tuple[tuple[int, int], ...] = ()  # Colin27 tasks: AAL regions (first, last) of each class


TEMPLATES = {
    "mni152": Template(
        {"background": 0, "grey_matter": 1, "white_matter": 2},
        "MNI152BrainTissue",
        "Grey / white matter of augmented copies of the MNI ICBM 2009a template",
        "http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009",
        MNI152_NOTICE + MNI152_CASES,
    ),
    "colin27": Template(
        {"background": 0, "cerebral_grey_matter": 1, "cerebellar_grey_matter": 2},
        "Colin27AALGreyMatter",
        "Cerebral / cerebellar grey matter (AAL) of augmented copies of the Colin27 T1",
        "Debian package mricron-data (MRIcron templates ch2.nii.gz, aal.nii.gz)",
        COLIN27_NOTICE,
        ((1, 90), (91, 116)),
    ),
    "colin27_deep": Template(
        {"background": 0, "caudate": 1, "putamen": 2, "thalamus": 3, "hippocampus": 4},
        "Colin27AALDeepGreyMatter",
        "Caudate, putamen, thalamus and hippocampus (AAL, left and right merged) of augmented copies of the Colin27 T1",
        "Debian package mricron-data (MRIcron templates ch2.nii.gz, aal.nii.gz)",
        COLIN27_NOTICE,
        ((71, 72), (73, 74), (77, 78), (37, 38)),
    ),
}


def load_templates(
    resolution: int, template: str = "mni152", mricron_dir: str | Path = MRICRON_DIR, labels: str = "posterior"
) -> tuple[np.ndarray, np.ndarray]:
    """(1 + K, X, Y, Z) float32 stack [T1, one probability map per foreground class] in [0, 1] (T1
    rescaled to its maximum), and its (4, 4) affine, at ``resolution`` mm. ``labels`` (MNI152 only):
    "posterior" (:func:`tissue_posteriors`) or "maps" (the template's maps as they are)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    if TEMPLATES[template].aal_regions:
        return _load_colin27(resolution, Path(mricron_dir), TEMPLATES[template].aal_regions)
    from nilearn import datasets  # optional dependency

    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution)
    wm = datasets.load_mni152_wm_template(resolution=resolution)
    if not (t1.shape == gm.shape == wm.shape and all(np.allclose(t1.affine, i.affine) for i in (gm, wm))):
        raise RuntimeError("nilearn's T1, grey and white matter templates are not on the same grid")
    t1_data, gm_data, wm_data = (img.get_fdata(dtype=np.float32) for img in (t1, gm, wm))
    maps = np.stack([gm_data, wm_data])
    if labels == "posterior":
        maps = tissue_posteriors(t1_data, maps)
    elif labels != "maps":
        raise ValueError(f"unknown labels {labels!r}; use posterior or maps")
    return np.concatenate([t1_data[None], maps]), t1.affine


def _load_colin27(
    resolution: int, mricron_dir: Path, regions: tuple[tuple[int, int], ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Colin27's 1 mm T1 and one mask per class (AAL regions ``first..last``), averaged over
    ``resolution``^3 blocks (the class masks become partial-volume fractions)."""
    paths = [mricron_dir / "ch2.nii.gz", mricron_dir / "aal.nii.gz"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)}: not found; install Debian's mricron-data (apt-get install mricron-data) or "
            f"give the folder that holds ch2.nii.gz and aal.nii.gz"
        )
    t1, aal = (nib.load(p) for p in paths)
    if t1.shape != aal.shape or not np.allclose(t1.affine, aal.affine) or not np.allclose(t1.header.get_zooms(), 1):
        raise RuntimeError(f"{paths[0]} and {paths[1]} are not on the same 1 mm grid")
    atlas = np.asanyarray(aal.dataobj)
    t1_data = np.asanyarray(t1.dataobj).astype(np.float32)
    stack = np.stack([t1_data / t1_data.max(), *((atlas >= first) & (atlas <= last) for first, last in regions)])
    pooled = torch.nn.functional.avg_pool3d(torch.from_numpy(stack.astype(np.float32)), resolution).numpy()
    return pooled, block_affine(t1.affine, resolution)


def region_notice(task: Template) -> str:
    """The notice's sentence on which AAL regions make up each class (empty without AAL regions)."""
    classes = [name for name in task.labels if name != "background"]
    merged = "; ".join(f"{first}-{last} into {name}" for (first, last), name in zip(task.aal_regions, classes))
    return f"AAL regions merged: {merged}." if merged else ""


def tissue_posteriors(t1: np.ndarray, priors: np.ndarray, iterations: int = 20) -> np.ndarray:
    """(K, X, Y, Z) posterior probabilities of the K tissue classes given the (X, Y, Z) T1 intensities,
    under a mixture of K + 1 Gaussians (a "rest" class, CSF in the brain, first) with the (K, X, Y, Z)
    ``priors`` (probability maps summing to at most 1) as each voxel's mixing weights, fitted by EM over
    the voxels where the priors' sum is above 0.05; 0 elsewhere. This is the prior-times-likelihood
    rule of atlas-based tissue segmentation (SPM's unified segmentation, FSL FAST), written here
    because neither MONAI nor nilearn has it for a single image."""
    weights = np.concatenate([np.clip(1.0 - priors.sum(0, keepdims=True), 0.0, 1.0), priors]).astype(np.float64)
    inside = priors.sum(0) > 0.05
    values, prior = t1[inside].astype(np.float64), weights[:, inside]
    posterior = prior / prior.sum(0, keepdims=True)
    for _ in range(iterations):
        total = posterior.sum(1)
        mean = (posterior * values).sum(1) / total
        var = np.maximum((posterior * (values - mean[:, None]) ** 2).sum(1) / total, 1e-8)
        posterior = prior * np.exp(-0.5 * (values - mean[:, None]) ** 2 / var[:, None]) / np.sqrt(var[:, None])
        posterior /= np.maximum(posterior.sum(0, keepdims=True), 1e-300)
    out = np.zeros(priors.shape, np.float32)
    out[:, inside] = posterior[1:]
    return out


def tissue_labels(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(X, Y, Z) uint8 labels from (K, X, Y, Z) class probabilities: k + 1 where class k is the likeliest
    (the first on ties) and its probability is at least ``threshold``, else 0."""
    labels = (probabilities.argmax(0) + 1).astype(np.uint8)
    labels[probabilities.max(0) < threshold] = 0
    return labels


def random_deformation(rng: np.random.Generator) -> RandAffine:
    """The random rotation, scaling, shear and shift every case gets (bilinear, zeros outside)."""
    deform = RandAffine(
        prob=1.0,
        rotate_range=(0.15, 0.15, 0.15),
        scale_range=(0.1, 0.1, 0.1),
        shear_range=(0.05, 0.05, 0.05),
        translate_range=(4, 4, 4),
        mode="bilinear",
        padding_mode="zeros",
    )
    deform.set_random_state(seed=int(rng.integers(2**31)))
    return deform


def intensity_changes(t1: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The (1, X, Y, Z) T1 in [0, 1] with a random gamma, bias field, noise and gain: (X, Y, Z) float32
    in arbitrary MR units."""
    image = torch.from_numpy(np.ascontiguousarray(t1, dtype=np.float32))
    for transform in (
        RandAdjustContrast(prob=1.0, gamma=(0.7, 1.5)),
        RandBiasField(prob=1.0, coeff_range=(0.1, 0.3)),
        RandGaussianNoise(prob=1.0, std=0.03),
    ):
        transform.set_random_state(seed=int(rng.integers(2**31)))
        image = torch.as_tensor(transform(image))
    return (np.clip(image[0].numpy(), 0.0, None) * rng.uniform(500.0, 1500.0)).astype(np.float32)


def augment(stack: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random deformation of the (1 + K, X, Y, Z) [T1, class probabilities] stack, then random T1
    intensity changes.

    Returns the (X, Y, Z) float32 T1 (arbitrary MR units) and the deformed (K, X, Y, Z) probabilities.
    """
    moved = torch.as_tensor(random_deformation(rng)(torch.from_numpy(stack))).numpy()
    return intensity_changes(moved[:1], rng), moved[1:]


def synthesis_maps(labels: str = "posterior") -> tuple[np.ndarray, np.ndarray]:
    """(3, X, Y, Z) float32 [grey matter, white matter, brain mask] of the MNI152 template at 1 mm
    (``labels`` as :func:`load_templates` takes it) and their (4, 4) affine: what :func:`synthesise` draws from."""
    from nilearn import datasets  # optional dependency

    stack, affine = load_templates(1, "mni152", labels=labels)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)
    return np.concatenate([stack[1:], brain[None]]), affine


def random_field(shape: tuple[int, ...], centre: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """(X, Y, Z) float32 smooth random threshold in [0.05, 0.95]: a uniform draw from ``centre`` plus up
    to 0.4 x unit-std noise smoothed over 2-6 voxels (drawn at half resolution, then upsampled)."""
    half = tuple((n + 1) // 2 for n in shape)
    noise = ndimage.gaussian_filter(rng.standard_normal(half).astype(np.float32), rng.uniform(1.0, 3.0))
    noise = ndimage.zoom(noise / (noise.std() + 1e-6), 2, order=1)[: shape[0], : shape[1], : shape[2]]
    return np.clip(rng.uniform(*centre) + rng.uniform(0.0, 0.4) * noise, 0.05, 0.95)


def synthesise(maps: np.ndarray, resolution: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One case drawn from the 1 mm (3, X, Y, Z) :func:`synthesis_maps`, SynthSeg-style: the maps
    deformed, cut into CSF / grey / white matter at random thresholds that vary smoothly in space (the
    cortex thinner or thicker, white matter reaching into the gyri or not: shapes the averaged template
    lacks), each tissue given a random T1-ordered mean and spread, blurred, averaged over
    ``resolution``^3 blocks (partial volume) and given :func:`intensity_changes`.

    Returns the (X', Y', Z') float32 T1 and uint8 labels (1 grey, 2 white matter; the larger block
    fraction) on the :func:`block_affine` grid.
    """
    grey, white, brain = torch.as_tensor(random_deformation(rng)(torch.from_numpy(maps))).numpy()
    tissue = grey + white
    is_tissue = tissue >= random_field(tissue.shape, (0.4, 0.6), rng)
    classes = (brain > 0.5).astype(np.int64)  # 0 outside the brain, 1 CSF, 2 grey, 3 white matter
    classes[is_tissue] = 2
    classes[is_tissue & (white > random_field(tissue.shape, (0.35, 0.65), rng) * tissue)] = 3
    white_mean = rng.uniform(0.7, 1.0)
    grey_mean = white_mean * rng.uniform(0.55, 0.85)
    means = np.array([0.0, grey_mean * rng.uniform(0.15, 0.6), grey_mean, white_mean])
    spreads = np.concatenate([[0.0], rng.uniform(0.01, 0.06, 3) * white_mean])
    image = means[classes] + rng.standard_normal(classes.shape) * spreads[classes]
    image = ndimage.gaussian_filter(image.astype(np.float32), rng.uniform(0.3, 1.2))
    layers = np.stack([image, *(classes == k for k in range(4))]).astype(np.float32)
    pooled = torch.nn.functional.avg_pool3d(torch.from_numpy(layers), resolution).numpy()
    labels = np.array([0, 0, 1, 2], np.uint8)[pooled[1:].argmax(0)]
    return intensity_changes(np.clip(pooled[:1], 0.0, None), rng), labels


def block_affine(affine: np.ndarray, resolution: int) -> np.ndarray:
    """The (4, 4) affine of a grid averaged over ``resolution``^3 blocks of the 1 mm grid ``affine``."""
    pooled = affine @ np.diag([resolution, resolution, resolution, 1.0])
    pooled[:3, 3] += affine[:3, :3] @ np.full(3, (resolution - 1) / 2)  # block centres
    return pooled


def prepare(
    out_dir: str | Path,
    num_train: int = 8,
    num_test: int = 2,
    seed: int = 0,
    resolution: int = 3,
    threshold: float = 0.5,
    template: str = "mni152",
    mricron_dir: str | Path = MRICRON_DIR,
    overwrite: bool = False,
    labels: str = "posterior",
    synthesised: bool = False,
) -> Path:
    """Write the ``template``'s brain task to ``out_dir`` (nnU-Net v2 raw layout) and return its path;
    ``overwrite``: replace a folder of this task written before (any other non-empty folder is refused);
    ``synthesised`` (mni152 only): cases from :func:`synthesise`, not deformed copies of the T1."""
    task = TEMPLATES[template]
    if synthesised and template != "mni152":
        raise ValueError(f"synthesised cases are drawn from the mni152 tissue maps, not from {template}")
    with new_dataset_folder(out_dir, task.name, overwrite) as out:
        if synthesised:
            maps, affine_1mm = synthesis_maps(labels)
            affine = block_affine(affine_1mm, resolution)
        else:
            stack, affine = load_templates(resolution, template, mricron_dir, labels)
        details = {
            "resolution": resolution, "num_cases": num_train + num_test, "seed": seed, "regions": region_notice(task)
        }  # fmt: skip
        if not task.aal_regions:  # the MNI152 notice names the nilearn release its files came from
            import nilearn

            details["nilearn_version"] = nilearn.__version__
            details["labels"] = LABEL_SOURCES[labels]
            details["cases"] = CASE_SOURCES[synthesised]
        for subset, count, prefix in (("Tr", num_train, "brain"), ("Ts", num_test, "brain_test")):
            for index in range(count):
                rng = np.random.default_rng([seed, int(subset == "Ts"), index])
                if synthesised:
                    t1, label = synthesise(maps, resolution, rng)
                else:
                    t1, probabilities = augment(stack, rng)
                    label = tissue_labels(probabilities, threshold=threshold)
                write_nnunet_case(
                    out, f"{prefix}_{index:04d}", [nib.Nifti1Image(t1, affine)], nib.Nifti1Image(label, affine), subset
                )
        write_dataset_json(
            out, CHANNEL_NAMES, task.labels, num_train, name=task.name, description=task.description,
            reference=task.reference, licence="see NOTICE.txt",
        )  # fmt: skip

        (out / "NOTICE.txt").write_text(task.notice.format(**details))
    return Path(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    parser = dataset_parser(__doc__)
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum tissue probability (default 0.5)")
    parser.add_argument("--template", choices=tuple(TEMPLATES), default="mni152", help="(default mni152)")
    parser.add_argument(
        "--labels", choices=("posterior", "maps"), default="posterior",
        help="mni152: tissue probabilities from the T1 and the maps (posterior, default) or the maps alone",
    )  # fmt: skip
    parser.add_argument(
        "--synthesise", action="store_true", help="mni152: cases synthesised from its tissue maps (SynthSeg-style)"
    )
    parser.add_argument(
        "--mricron-dir", type=Path, default=MRICRON_DIR, help=f"colin27's files (default {MRICRON_DIR})"
    )
    return run(
        parser, argv,
        lambda args: prepare(
            args.out_dir, args.num_train, args.num_test, args.seed, args.resolution, args.threshold, args.template,
            args.mricron_dir, args.overwrite, args.labels, args.synthesise,
        ),
        f"the mni152 template needs nilearn: {INSTALL_NILEARN}",
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
