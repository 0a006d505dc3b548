"""Grey / white matter Dice of brain tissue models on a T1 brain none of them was trained on, at several
resolutions, through the shipped predictor (``veloxseg.predict``, as ``veloxseg predict`` runs it).

    python benchmarks/brain_generalisation.py --models veloxseg_small veloxseg_small_hr --resolutions 1 1.5 2 3
    python benchmarks/brain_generalisation.py --models local-dir:runs/tissue --out benchmarks/results/mine

The held-out scan is Colin27 skull-stripped (``ch2bet.nii.gz`` of Debian's mricron-data, ``apt-get install
mricron-data``; no tag trains on Colin27): exact zeros outside the brain, as skull-stripped scans are, and
a scanner, averaging and intensity range of its own. Its reference labels are a three-class clustering of
its brain voxels' intensities (k-means: CSF, grey matter, white matter; the CSF joins the background, as
in the MNI152 tissue tags' labels). Colin27 is an average of 27 scans with a high signal-to-noise ratio,
which makes intensity clustering a fair reference, but not a manual one: Dice against it is a measure
of agreement, not of accuracy. Each resolution is the 1 mm scan resampled (images trilinear, labels by
the largest resampled class fraction), written as NIfTI and given to ``veloxseg.predict`` as a user's
file would be. Registry names load their default tag (``pretrained=True``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing

import veloxseg
from veloxseg.predict import predict

MRICRON_DIR = Path("/usr/share/mricron/templates")
CLASSES = ("grey_matter", "white_matter")


def tissue_clusters(t1: np.ndarray, iterations: int = 50) -> np.ndarray:
    """(X, Y, Z) uint8 labels of a skull-stripped T1: 0 outside the brain and in the darkest (CSF)
    cluster, 1 grey matter, 2 white matter, by 1-D k-means (3 clusters) of the nonzero voxels."""
    brain = t1 > 0
    values = t1[brain].astype(np.float64)
    centres = np.percentile(values, [10, 50, 90])
    for _ in range(iterations):
        assigned = np.abs(values[:, None] - centres[None]).argmin(1)
        centres = np.array([values[assigned == k].mean() for k in range(3)])
    labels = np.zeros(t1.shape, np.uint8)
    labels[brain] = np.array([0, 1, 2], np.uint8)[np.abs(values[:, None] - centres[None]).argmin(1)]
    return labels


def heldout_scans(resolutions: Sequence[float], folder: Path, mricron_dir: Path = MRICRON_DIR) -> dict[float, Path]:
    """Write Colin27 skull-stripped and its labels at each resolution (mm) into ``folder``; returns
    resolution -> image path (its labels beside it, ``*_labels.nii.gz``)."""
    source = mricron_dir / "ch2bet.nii.gz"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: apt-get install mricron-data, or give --mricron-dir")
    img = nib.load(source)
    t1 = np.asarray(img.dataobj, dtype=np.float32)
    onehot = np.eye(3, dtype=np.float32)[tissue_clusters(t1)].transpose(3, 0, 1, 2)
    affine = torch.as_tensor(img.affine, dtype=torch.float64)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for mm in resolutions:
        resample = Spacing(pixdim=(mm, mm, mm), mode="bilinear", dtype=torch.float32)
        image = resample(MetaTensor(torch.from_numpy(t1[None]), affine=affine))
        fractions = resample(MetaTensor(torch.from_numpy(onehot), affine=affine))
        out_affine = np.asarray(image.affine, dtype=np.float64)
        path = folder / f"colin27_{mm:g}mm.nii.gz"
        nib.save(nib.Nifti1Image(np.clip(image[0].numpy(), 0, None), out_affine), path)
        labels = fractions.argmax(0).numpy().astype(np.uint8)
        nib.save(nib.Nifti1Image(labels, out_affine), folder / f"colin27_{mm:g}mm_labels.nii.gz")
        paths[mm] = path
    return paths


def dice(prediction: np.ndarray, label: np.ndarray, value: int) -> float:
    """Dice of class ``value`` between two label maps of one shape."""
    p, t = prediction == value, label == value
    return float(2 * (p & t).sum() / max(1, p.sum() + t.sum()))


def score(
    model_name: str, scans: dict[float, Path], mirror_axes: Sequence[int] = ()
) -> dict[str, dict[str, float]]:
    """resolution -> {class: Dice, "mean": ...} of ``model_name`` (registry name: its default tag), segmented
    with test-time mirroring along ``mirror_axes`` (``veloxseg predict --tta``: all three)."""
    model = veloxseg.create_model(model_name, pretrained=True).eval()
    rows = {}
    for mm, path in scans.items():
        prediction = np.asarray(predict(model, path, mirror_axes=mirror_axes).dataobj)
        label = np.asarray(nib.load(str(path).replace(".nii.gz", "_labels.nii.gz")).dataobj)
        row = {name: dice(prediction, label, value) for value, name in enumerate(CLASSES, start=1)}
        rows[f"{mm:g}"] = {**row, "mean": float(np.mean(list(row.values())))}
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["veloxseg_small", "veloxseg_small_hr"])
    parser.add_argument("--resolutions", nargs="+", type=float, default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/veloxseg-brain-generalisation"))
    parser.add_argument("--mricron-dir", type=Path, default=MRICRON_DIR)
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--tta", action="store_true", help="test-time mirroring, as veloxseg predict --tta")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    scans = heldout_scans(args.resolutions, args.work_dir, args.mricron_dir)
    results = {name: score(name, scans, (0, 1, 2) if args.tta else ()) for name in args.models}
    lines = [
        "| model | " + " | ".join(f"{mm:g} mm (grey / white)" for mm in args.resolutions) + " |",
        "| --- |" + " --- |" * len(args.resolutions),
    ]
    for name, rows in results.items():
        cells = [f"{r['mean']:.3f} ({r['grey_matter']:.3f} / {r['white_matter']:.3f})" for r in rows.values()]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        command = "python benchmarks/brain_generalisation.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out.with_suffix(".md").write_text(
            f"# Brain tissue on a held-out T1 (Colin27 skull-stripped)\n\n`{command}`\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
