"""NIfTI files as every command reads them: their names, the errors a bad file raises, its voxel values."""

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# What nibabel raises on a file that is not NIfTI, truncated or corrupt (header or voxels).
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)


def nifti_stem(path: Path) -> str:
    """``case.nii.gz`` -> ``case`` (the name without its NIfTI suffix; ``path`` must have one)."""
    return path.name[: -len(next(s for s in NIFTI_SUFFIXES if path.name.endswith(s)))]


def nonfinite_voxels(data: np.ndarray) -> int:
    """How many voxels are NaN or infinite once read as float32 (as training and inference read them:
    a larger value is an infinity there)."""
    with np.errstate(over="ignore"):
        return int(data.size - np.count_nonzero(np.isfinite(np.asarray(data, dtype=np.float32))))


def nonfinite_problem(name: str, count: int) -> str:
    """The message for ``count`` non-finite voxels of image ``name`` (the same wording as the model's)."""
    return f"{name} holds {count} non-finite voxels (NaN/inf, or beyond float32's range 3.4e38)"
