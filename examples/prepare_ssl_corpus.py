"""Prepare the unlabelled corpus of the self-supervised generalist tags (``--stage pretrain``).

Every volume this machine can get without a download, as one-channel scans (channel ``image``,
z-scored per scan by the trainer):

* the built-in synthetic PET/CT generator (``veloxseg.data.demo``), CT and PET as separate scans, at
  several seeds and shapes;
* the MNI ICBM 2009a T1 template that ships in the nilearn wheel, at 1, 2 and 3 mm, in randomly
  deformed copies (``prepare_brain_templates.augment``);
* the INIA19 rhesus macaque T1 template of Debian's mricron-data package (``apt-get install
  mricron-data``), at 1 and 1.5 mm, likewise; skipped with a message when the package is absent.

The Colin27 T1 of mricron-data is left out on purpose: it is the held-out task of
``benchmarks/finetune.py`` (``prepare_brain_templates.py --template colin27``).

The trainer samples patches around a label's foreground, so each scan gets a label that is only a
rough object mask (intensity above 15 % of its 1-99th percentile range); pretraining never reads it
as a target. Written as an nnU-Net v2 raw folder with a NOTICE.txt recording each source and its
license. Usage::

    python examples/prepare_ssl_corpus.py OUT_DIR [--copies 3] [--synthetic 12] [--seed 0]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from prepare_brain_templates import MNI152_NOTICE, MRICRON_DIR, augment
from prepare_common import INSTALL_NILEARN, dataset_parser, run

from veloxseg.data.datasets import new_dataset_folder, write_dataset_json, write_nnunet_case
from veloxseg.data.demo import GENERATOR_VERSION, generate_case

DATASET_NAME = "VeloxSegSSLCorpus"  # dataset.json's name

SYNTHETIC_SHAPES = ((96, 96, 64), (128, 96, 80), (80, 80, 96), (112, 112, 48))
INIA19_NOTICE = """\
INIA19 rhesus macaque T1 template (inia19-t1-brain.nii.gz), as shipped in Debian's mricron-data
package {version} (MRIcron templates; Debian records the package under the BSD-3-clause license,
copyright Chris Rorden). Averaged here over 2^3 and 3^3 blocks. Please cite: T. Rohlfing et al.
The INIA19 template and NeuroMaps atlas for primate brain image parcellation and spatial
normalization. Frontiers in Neuroinformatics 6:27, 2012.
"""
SYNTHETIC_NOTICE = """\
Synthetic PET/CT-like scans of veloxseg.data.demo (generator {version}), seeds {seeds}: no patient
data; Apache-2.0 like the rest of veloxseg.
"""


def object_mask(image: np.ndarray) -> np.ndarray:
    """(X, Y, Z) uint8: 1 where ``image`` is above 15 % of its 1st-99th percentile range (a rough object mask)."""
    lo, hi = np.percentile(image, (1, 99))
    return (image > lo + 0.15 * (hi - lo)).astype(np.uint8)


def synthetic_scans(count: int, seed: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, (X, Y, Z) float32 scan, affine): the CT and the PET of ``count`` generator cases."""
    for index in range(count):
        shape = SYNTHETIC_SHAPES[index % len(SYNTHETIC_SHAPES)]
        case = generate_case(1000 + seed, index, shape)
        (ct, pet), _ = case.to_nifti()
        for name, image in (("ct", ct), ("pet", pet)):
            yield f"synthetic_{name}_{index:03d}", image.get_fdata(dtype=np.float32), image.affine


def template_scans(
    name: str, stack: np.ndarray, affine: np.ndarray, copies: int, rng: np.random.Generator
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``copies`` random deformations of the (1 + K, X, Y, Z) [T1, ...] ``stack`` (its T1 only)."""
    for copy in range(copies):
        t1, _ = augment(stack, rng)
        yield f"{name}_{copy:03d}", t1, affine


def mni152_stacks() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    from nilearn import datasets  # optional dependency

    for resolution in (1, 2, 3):
        t1 = datasets.load_mni152_template(resolution=resolution)
        data = t1.get_fdata(dtype=np.float32)
        yield f"mni152_{resolution}mm", (data / data.max())[None], t1.affine


def inia19_stacks(mricron_dir: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    path = mricron_dir / "inia19-t1-brain.nii.gz"
    if not path.is_file():
        print(f"skipping INIA19: {path} not found (apt-get install mricron-data)")
        return
    image = nib.load(path)
    data = torch.from_numpy(np.clip(image.get_fdata(dtype=np.float32), 0, None))[None]
    for factor in (2, 3):  # 0.5 mm -> 1 and 1.5 mm
        pooled = torch.nn.functional.avg_pool3d(data, factor).numpy()
        affine = image.affine @ np.diag([factor, factor, factor, 1.0])
        affine[:3, 3] += image.affine[:3, :3] @ np.full(3, (factor - 1) / 2)
        yield f"inia19_{factor * 0.5:g}mm".replace(".", "p"), pooled / pooled.max(), affine


def prepare(
    out_dir: str | Path, copies: int = 3, synthetic: int = 12, seed: int = 0, mricron_dir: Path = MRICRON_DIR,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write the corpus to ``out_dir`` (nnU-Net v2 raw layout, training cases only) and return its path;
    ``overwrite``: replace a corpus written before (any other non-empty folder is refused)."""
    with new_dataset_folder(out_dir, DATASET_NAME, overwrite) as out:
        import nilearn

        rng = np.random.default_rng(seed)
        sources = [synthetic_scans(synthetic, seed)]
        notices = [SYNTHETIC_NOTICE.format(version=GENERATOR_VERSION, seeds=1000 + seed)]
        sources += [template_scans(name, stack, affine, copies, rng) for name, stack, affine in mni152_stacks()]
        notices.append(MNI152_NOTICE.format(nilearn_version=nilearn.__version__, resolution="1, 2 and 3") + (
            f"\nThe {3 * copies} MNI152 scans here are random deformations and intensity changes of that single\n"
            f"template (seed {seed}), without labels.\n"
        ))  # fmt: skip
        stacks = inia19_stacks(mricron_dir)
        inia19 = [template_scans(name, stack, affine, copies, rng) for name, stack, affine in stacks]
        if inia19:
            sources += inia19
            notices.append(INIA19_NOTICE.format(version=_debian_version("mricron-data")))
        count = 0
        for scans in sources:
            for name, image, affine in scans:
                mask = nib.Nifti1Image(object_mask(image), affine)
                write_nnunet_case(out, name, [nib.Nifti1Image(image.astype(np.float32), affine)], mask)
                count += 1
        write_dataset_json(
            out, ["image"], {"background": 0, "object": 1}, count, name=DATASET_NAME,
            description="Unlabelled scans for self-supervised pretraining (labels are rough object masks for sampling)",
            licence="see NOTICE.txt",
        )  # fmt: skip
        header = "Sources of this corpus, each with its license. The labels are rough intensity masks.\n\n"
        (out / "NOTICE.txt").write_text(header + "\n---\n\n".join(notices))
    return Path(out_dir)


def _debian_version(package: str) -> str:
    """The installed version of a Debian package, from dpkg's status file ("unknown version" without dpkg)."""
    status = Path("/var/lib/dpkg/status")
    if status.is_file():
        for block in status.read_text(errors="replace").split("\n\n"):
            if f"Package: {package}\n" in block + "\n":
                for line in block.splitlines():
                    if line.startswith("Version: "):
                        return line.removeprefix("Version: ")
    return "(unknown version)"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    parser = dataset_parser(__doc__, counts=False)
    parser.add_argument("--copies", type=int, default=3, help="deformed copies per template and resolution")
    parser.add_argument("--synthetic", type=int, default=12, help="synthetic PET/CT cases (2 scans each)")
    parser.add_argument("--mricron-dir", type=Path, default=MRICRON_DIR, help=f"(default {MRICRON_DIR})")
    return run(
        parser, argv,
        lambda args: prepare(args.out_dir, args.copies, args.synthetic, args.seed, args.mricron_dir, args.overwrite),
        f"nilearn is needed: {INSTALL_NILEARN}",
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
