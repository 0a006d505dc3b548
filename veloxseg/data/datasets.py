"""Read, validate and split users' 3-D segmentation datasets.

Two on-disk layouts are understood and detected automatically from ``dataset.json``:

* nnU-Net v2 raw (``channel_names`` key): ``imagesTr/<case>_<XXXX><file_ending>`` with one 3-D
  file per channel ``XXXX``, ``labelsTr/<case><file_ending>``, optional ``imagesTs``/``labelsTs``.
* Medical Segmentation Decathlon (``modality`` key): ``training`` lists ``{"image", "label"}``
  paths; an image holds every channel as a 4-D NIfTI (channels last), or is 3-D with one channel.

Every case becomes a :class:`Case`; :meth:`Case.as_dict` gives the ``{"image": [...], "label": ...}``
dictionaries that the MONAI transforms in :mod:`veloxseg.data.transforms` load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np

from ..io import atomic_folder, temporary_folder
from ..modalities import channel_file_name, channel_file_pattern
from ..nifti import READ_ERRORS, nonfinite_problem, nonfinite_voxels

SPLITS_FILE = "splits_final.json"
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class DatasetError(ValueError):
    """A dataset is malformed. ``problems`` holds one line per problem, each naming its case or file."""

    def __init__(self, root: str | Path, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"dataset {root}: {len(self.problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class Case:
    """One case. ``images`` holds one 3-D file per channel, or one file holding every channel."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        """``{"case_id", "image": [paths], "label": path}`` (no ``label`` key when there is none)."""
        item: dict[str, Any] = {"case_id": self.case_id, "image": [str(p) for p in self.images]}
        if self.label is not None:
            item["label"] = str(self.label)
        return item


@dataclass
class DatasetSpec:
    """A dataset as described by its ``dataset.json`` and found on disk."""

    root: Path
    channel_names: list[str]
    labels: dict[str, int]
    training: list[Case]
    test: list[Case]
    file_ending: str = ".nii.gz"
    layout: Literal["nnunet", "msd"] = "nnunet"
    num_training: int | None = None
    """``numTraining`` as declared in ``dataset.json`` (checked by :func:`validate_dataset`)."""


def read_dataset(root: str | Path) -> DatasetSpec:
    """Read ``root/dataset.json`` and list the cases of an nnU-Net v2 raw or MSD folder.

    Only file names are looked at; call :func:`validate_dataset` to check the files themselves.
    Raises :class:`DatasetError` when ``dataset.json`` is missing or malformed, or when
    ``imagesTr`` holds file names that do not follow the layout.
    """
    root = Path(root)
    meta = _load_json(root, root / "dataset.json")
    if not isinstance(meta, dict):
        raise DatasetError(root, ["dataset.json must hold a JSON object"])
    if "channel_names" in meta:
        return _read_nnunet(root, meta)
    if "modality" in meta:
        return _read_msd(root, meta)
    raise DatasetError(
        root,
        ["dataset.json has neither 'channel_names' (nnU-Net v2) nor 'modality' (Medical Segmentation Decathlon)"],
    )


def validate_dataset(
    spec: DatasetSpec,
    check_geometry: bool = True,
    check_values: bool = True,
    affine_tol: float = 1e-3,
    require_foreground: bool = False,
) -> None:
    """Check every case on disk and raise one :class:`DatasetError` listing all problems found.

    Always checked: files exist and their headers are readable, channel count matches
    ``channel_names``. ``check_geometry``: every image has the label's spatial shape and an affine
    equal within ``affine_tol`` (mm). ``check_values`` (reads the voxel data, one file at a time):
    the data decompresses (truncated files fail here), images hold no NaN/inf, and label values are
    integers listed in ``labels``. ``require_foreground`` (with ``check_values``; for segmentation):
    some training label holds a foreground voxel.
    """
    problems: list[str] = []
    seen: set[float] = set()  # label values found in the training cases
    if not spec.training:
        problems.append("no training cases found")
    if spec.num_training is not None and spec.num_training != len(spec.training):
        problems.append(f"dataset.json says numTraining={spec.num_training} but {len(spec.training)} cases were found")
    for cases, found in ((spec.training, seen), (spec.test, set())):
        for case in cases:
            problems += [
                f"{case.case_id}: {p}"
                for p in _case_problems(spec, case, check_geometry, check_values, affine_tol, found)
            ]
    if require_foreground and check_values and spec.training and not problems and not seen - {0}:
        problems.append(
            f"no training label holds a foreground voxel (every label is background 0 of {spec.labels}): "
            f"segmentation would have nothing to learn (Dice NaN)"
        )
    if problems:
        raise DatasetError(spec.root, problems)


def class_frequencies(cases: Sequence[Case], n_classes: int) -> np.ndarray:
    """The share of each class 0..n_classes-1 among the voxels of the cases' labels, shape (n_classes,).

    Reads every label once (a dataset's class balance, as nnU-Net's fingerprint counts it); a class absent
    from all of them gets 0. Raises ValueError naming the case whose label is missing or holds a value
    outside 0..n_classes-1.
    """
    counts = np.zeros(n_classes, dtype=np.int64)
    for case in cases:
        if case.label is None:
            raise ValueError(f"{case.case_id}: no label to count classes in")
        values = np.asarray(nib.load(case.label).dataobj)
        found = np.unique(values)
        bad = found[(found < 0) | (found >= n_classes) | (found != np.round(found))]
        if bad.size:
            raise ValueError(f"{case.case_id}: label values {bad.tolist()} are not classes 0..{n_classes - 1}")
        counts += np.bincount(values.astype(np.int64).ravel(), minlength=n_classes)
    if not counts.sum():
        raise ValueError("no labelled voxels to count classes in")
    return counts / counts.sum()


def kfold_splits(case_ids: Sequence[str], num_folds: int = 5, seed: int = 0) -> list[dict[str, list[str]]]:
    """nnU-Net-style folds: a shuffled list of ``{"train": [...], "val": [...]}``, each case in one ``val``."""
    if not 2 <= num_folds <= len(case_ids):
        raise ValueError(f"num_folds must be between 2 and the number of cases ({len(case_ids)}), got {num_folds}")
    order = np.random.default_rng(seed).permutation(len(case_ids))
    folds = []
    for fold in range(num_folds):
        val = {case_ids[i] for i in order[fold::num_folds]}
        folds.append({"train": [c for c in case_ids if c not in val], "val": [c for c in case_ids if c in val]})
    return folds


def split_cases(
    spec: DatasetSpec, val_fraction: float = 0.2, seed: int = 0, fold: int = 0
) -> tuple[list[Case], list[Case]]:
    """Training and validation cases of fold ``fold``.

    Uses ``root/splits_final.json`` (nnU-Net format) when present. Otherwise the cases are shuffled
    with ``seed`` into ``round(1 / val_fraction)`` folds, so the validation share is ``val_fraction``
    rounded to one over a whole number.
    """
    by_id = {case.case_id: case for case in spec.training}
    splits_path = spec.root / SPLITS_FILE
    if splits_path.is_file():
        splits = _load_json(spec.root, splits_path)
        if not isinstance(splits, list) or not all(
            isinstance(f, dict) and {"train", "val"} <= f.keys() for f in splits
        ):
            raise DatasetError(spec.root, [f'{SPLITS_FILE} must be a list of {{"train": [...], "val": [...]}}'])
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if len(by_id) < 2:
            raise DatasetError(spec.root, [f"need at least 2 training cases to split, found {len(by_id)}"])
        num_folds = min(len(by_id), max(2, round(1.0 / val_fraction)))
        splits = kfold_splits(list(by_id), num_folds, seed)
    if not 0 <= fold < len(splits):
        raise DatasetError(spec.root, [f"fold {fold} requested but there are {len(splits)} fold(s)"])
    ids = splits[fold]
    train, val = ids["train"], ids["val"]
    problems = [f"{SPLITS_FILE} fold {fold}: its {name} list is empty" for name in ("train", "val") if not ids[name]]
    unknown = [c for c in train + val if c not in by_id]
    if unknown:
        problems.append(f"{SPLITS_FILE} names cases not in the training set: {unknown}")
    both = sorted(set(train) & set(val))
    if both:
        problems.append(
            f"{SPLITS_FILE} fold {fold}: {len(both)} case(s) in both train and val ({', '.join(both[:5])}"
            f"{', ...' if len(both) > 5 else ''}): validation would score cases the model trained on"
        )
    if problems:
        raise DatasetError(spec.root, problems)
    return [by_id[c] for c in train], [by_id[c] for c in val]


def write_dataset_json(
    root: str | Path,
    channel_names: Sequence[str],
    labels: Mapping[str, int],
    num_training: int,
    file_ending: str = ".nii.gz",
    **extra: Any,
) -> Path:
    """Write an nnU-Net v2 ``dataset.json`` (``extra`` keys such as ``name`` are added as given)."""
    meta = {
        "channel_names": {str(i): name for i, name in enumerate(channel_names)},
        "labels": dict(labels),
        "numTraining": num_training,
        "file_ending": file_ending,
        **extra,
    }
    path = Path(root) / "dataset.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


@contextmanager
def new_dataset_folder(out: str | Path, name: str, overwrite: bool = False) -> Iterator[Path]:
    """The folder to fill with dataset ``name`` (its dataset.json's ``name``), renamed to ``out`` when the
    block ends without an error (:func:`veloxseg.io.atomic_folder`): a crash leaves no half-written
    dataset. ``out`` must be new or empty, or with ``overwrite`` hold a dataset of that ``name`` (one the
    same command wrote); anything else is refused (FileExistsError, one line) before anything is written."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not (overwrite and _dataset_name(out) == name):
            what = "is a file" if not out.is_dir() else "is not empty"
            raise FileExistsError(
                f"{out} {what}: the {name} dataset is written into a new or empty folder only"
                + (", or with --overwrite over a folder of that dataset" if out.is_dir() else "")
            )
    try:
        with atomic_folder(out) as tmp:
            yield tmp
    except BaseException:
        shutil.rmtree(temporary_folder(Path(os.path.abspath(out))), ignore_errors=True)  # nothing half-written stays
        raise


def _dataset_name(folder: Path) -> str | None:
    """The ``name`` in ``folder``'s dataset.json; None when it has none or no readable one."""
    try:
        meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta.get("name") if isinstance(meta, dict) else None


def write_nnunet_case(
    root: str | Path,
    case_id: str,
    images: Sequence[nib.Nifti1Image],
    label: nib.Nifti1Image | None = None,
    subset: Literal["Tr", "Ts"] = "Tr",
    file_ending: str = ".nii.gz",
) -> Case:
    """Save one case as ``images<subset>/<case>_<XXXX>`` (one 3-D image per channel) and ``labels<subset>/<case>``."""
    if not _CASE_ID.match(case_id):
        raise ValueError(f"case id {case_id!r} is not a safe file name (letters, digits, '_', '-', '.')")
    root = Path(root)
    (root / f"images{subset}").mkdir(parents=True, exist_ok=True)
    paths = []
    for channel, image in enumerate(images):
        paths.append(root / f"images{subset}" / channel_file_name(case_id, channel, file_ending))
        nib.save(image, paths[-1])
    label_path = None
    if label is not None:
        (root / f"labels{subset}").mkdir(parents=True, exist_ok=True)
        label_path = root / f"labels{subset}" / f"{case_id}{file_ending}"
        nib.save(label, label_path)
    return Case(case_id, tuple(paths), label_path)


def from_hf_dataset(
    ds: Any,
    out_dir: str | Path,
    image_columns: Sequence[str],
    label_column: str,
    labels: Mapping[str, int],
    channel_names: Sequence[str] | None = None,
    case_id_column: str | None = None,
) -> DatasetSpec:
    """Write a Hugging Face ``datasets.Dataset`` of NIfTI columns as an nnU-Net v2 folder and read it.

    ``image_columns`` hold one 3-D image per channel, ``label_column`` the label map. Columns may
    use the ``datasets.Nifti`` feature (``datasets`` >= 4.1) or hold file paths / raw NIfTI bytes,
    which are cast to ``Nifti``. ``channel_names`` default to the column names; case ids come from
    ``case_id_column`` or are ``case_0000``, ``case_0001``, ... Every row is written as a training
    case under ``out_dir``; the returned spec is ``read_dataset(out_dir)`` (validate it before use).
    """
    from datasets import Nifti  # optional dependency, only needed here

    out_dir = Path(out_dir)
    columns = [*image_columns, label_column]
    missing = [c for c in columns + ([case_id_column] if case_id_column else []) if c not in ds.column_names]
    if missing:
        raise DatasetError(out_dir, [f"Hugging Face dataset has no column(s) {missing}; it has {ds.column_names}"])
    for column in columns:
        if not isinstance(ds.features[column], Nifti):
            try:
                ds = ds.cast_column(column, Nifti())
            except (TypeError, ValueError) as err:
                raise DatasetError(out_dir, [f"column {column!r} cannot be read as NIfTI: {err}"]) from err
    problems = []
    for index in range(len(ds)):
        case_id = f"case_{index:04d}"
        try:
            row = ds[index]
            case_id = str(row[case_id_column]) if case_id_column else case_id
            write_nnunet_case(out_dir, case_id, [row[c] for c in image_columns], row[label_column])
        except READ_ERRORS as err:
            problems.append(f"row {index} ({case_id}): {type(err).__name__}: {err}")
    if problems:
        raise DatasetError(out_dir, problems)
    write_dataset_json(out_dir, channel_names or list(image_columns), labels, len(ds))
    return read_dataset(out_dir)


def _load_json(root: Path, path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(root, [f"{path.name} not found in {path.parent}"]) from None
    except json.JSONDecodeError as err:
        raise DatasetError(root, [f"{path.name} is not valid JSON: {err}"]) from None


def _indexed_names(root: Path, mapping: Any, key: str) -> list[str]:
    """``{"0": a, "1": b}`` -> ``[a, b]``; the keys must be 0..n-1."""
    if not isinstance(mapping, dict) or not mapping:
        raise DatasetError(root, [f'dataset.json \'{key}\' must be a non-empty object like {{"0": "CT"}}'])
    if sorted(mapping, key=str) != [str(i) for i in range(len(mapping))]:
        raise DatasetError(root, [f"dataset.json '{key}' keys must be 0..{len(mapping) - 1}, got {list(mapping)}"])
    return [str(mapping[str(i)]) for i in range(len(mapping))]


def _check_labels(root: Path, labels: dict[str, Any]) -> dict[str, int]:
    bad = {name: value for name, value in labels.items() if not isinstance(value, int) or isinstance(value, bool)}
    if bad:
        raise DatasetError(
            root, [f"dataset.json labels must map names to integers (region labels are not supported): {bad}"]
        )
    if 0 not in labels.values():
        raise DatasetError(root, [f"dataset.json labels need a background class 0, got {labels}"])
    return labels


def _read_nnunet(root: Path, meta: dict[str, Any]) -> DatasetSpec:
    channel_names = _indexed_names(root, meta["channel_names"], "channel_names")
    if not isinstance(meta.get("labels"), dict) or "file_ending" not in meta:
        raise DatasetError(root, ["nnU-Net dataset.json needs 'labels' (name -> int) and 'file_ending'"])
    labels = _check_labels(root, meta["labels"])
    ending = meta["file_ending"]
    if not (root / "imagesTr").is_dir():
        raise DatasetError(root, ["imagesTr folder not found"])
    training = _scan_nnunet(root, "Tr", len(channel_names), ending, label_required=True)
    test = _scan_nnunet(root, "Ts", len(channel_names), ending, label_required=False)
    return DatasetSpec(root, channel_names, labels, training, test, ending, "nnunet", meta.get("numTraining"))


def _scan_nnunet(root: Path, subset: str, num_channels: int, ending: str, label_required: bool) -> list[Case]:
    """Cases found in ``images<subset>``/``labels<subset>``; missing files are left for validation."""
    images_dir, labels_dir = root / f"images{subset}", root / f"labels{subset}"
    pattern = channel_file_pattern(ending)
    case_ids, stray = set(), []
    for path in sorted(images_dir.glob(f"*{ending}")):
        match = pattern.match(path.name)
        if match is None or int(match["channel"]) >= num_channels:
            stray.append(f"images{subset}/{path.name}")
        else:
            case_ids.add(match["case"])
    if stray:
        raise DatasetError(
            root, [f"{name}: not named <case>_<channel 0000..{num_channels - 1:04d}>{ending}" for name in stray]
        )
    has_labels = label_required or labels_dir.is_dir()
    if has_labels:
        case_ids |= {p.name[: -len(ending)] for p in labels_dir.glob(f"*{ending}")}
    return [
        Case(
            case_id,
            tuple(images_dir / channel_file_name(case_id, c, ending) for c in range(num_channels)),
            labels_dir / f"{case_id}{ending}" if has_labels else None,
        )
        for case_id in sorted(case_ids)
    ]


def _read_msd(root: Path, meta: dict[str, Any]) -> DatasetSpec:
    channel_names = _indexed_names(root, meta["modality"], "modality")
    label_names = _indexed_names(root, meta.get("labels"), "labels")
    labels = _check_labels(root, {name: value for value, name in enumerate(label_names)})
    training_entries = meta.get("training")
    if not isinstance(training_entries, list) or not all(
        isinstance(e, dict) and {"image", "label"} <= e.keys() for e in training_entries
    ):
        raise DatasetError(root, ['MSD dataset.json \'training\' must be a list of {"image": ..., "label": ...}'])
    training = [Case(_msd_case_id(e["image"]), (root / e["image"],), root / e["label"]) for e in training_entries]
    test = [Case(_msd_case_id(p), (root / p,)) for p in meta.get("test", [])]
    return DatasetSpec(root, channel_names, labels, training, test, ".nii.gz", "msd", meta.get("numTraining"))


def _msd_case_id(path: str) -> str:
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def _case_problems(
    spec: DatasetSpec, case: Case, check_geometry: bool, check_values: bool, affine_tol: float, seen: set[float]
) -> list[str]:
    """Problems of one case, each a short sentence naming the file concerned; its label values are added to ``seen``."""
    problems: list[str] = []
    per_channel = spec.layout == "nnunet"
    names = [f"channel {i} ({n})" for i, n in enumerate(spec.channel_names)] if per_channel else ["image"]
    images = [_open_header(spec, path, what, problems) for path, what in zip(case.images, names)]
    label = _open_header(spec, case.label, "label", problems) if case.label is not None else None
    if problems:
        return problems
    problems += _shape_problems(spec, case, images, label)
    if check_geometry and not problems:
        problems += _geometry_problems(spec, case, images, label, affine_tol)
    if check_values:
        problems += _value_problems(spec, case, images, label, seen)
    return problems


def _relative(spec: DatasetSpec, path: Path) -> str:
    """``path`` relative to the dataset's root when it lies under it, else as given: how problems name files."""
    return str(path.relative_to(spec.root)) if path.is_relative_to(spec.root) else str(path)


def _open_header(spec: DatasetSpec, path: Path, what: str, problems: list[str]) -> nib.Nifti1Image | None:
    """The NIfTI image at ``path`` (its header read, its data not yet), or ``None`` after noting in
    ``problems`` that the ``what`` file is missing or unreadable."""
    if not path.is_file():
        problems.append(f"missing {what} file {_relative(spec, path)}")
        return None
    try:
        return nib.load(path)
    except READ_ERRORS as err:
        problems.append(f"unreadable {what} file {_relative(spec, path)}: {type(err).__name__}: {err}")
        return None


def _shape_problems(
    spec: DatasetSpec, case: Case, images: list[nib.Nifti1Image], label: nib.Nifti1Image | None
) -> list[str]:
    """Images and label of the wrong dimensionality: 3-D per channel file (nnU-Net), 3-D or 4-D with the
    dataset's channels last (MSD), a 3-D label."""
    problems: list[str] = []
    if spec.layout == "nnunet":
        for path, img in zip(case.images, images):
            if img.ndim != 3:
                problems.append(f"{_relative(spec, path)} is {img.ndim}-D, expected 3-D")
    else:
        found = images[0].shape[3] if images[0].ndim == 4 else 1 if images[0].ndim == 3 else None
        if found != len(spec.channel_names):
            problems.append(
                f"{_relative(spec, case.images[0])} has shape {images[0].shape}, expected {len(spec.channel_names)} "
                f"channel(s) ({', '.join(spec.channel_names)}) as a 3-D or 4-D (channels last) image"
            )
    if label is not None and label.ndim != 3:
        problems.append(f"label {_relative(spec, case.label)} is {label.ndim}-D, expected 3-D")
    return problems


def _geometry_problems(
    spec: DatasetSpec, case: Case, images: list[nib.Nifti1Image], label: nib.Nifti1Image | None, affine_tol: float
) -> list[str]:
    """Images whose grid (shape or affine, within ``affine_tol`` mm) differs from the label's, or from the
    first image's when the case has no label."""
    reference_path, reference = (case.label, label) if label is not None else (case.images[0], images[0])
    reference_name = _relative(spec, reference_path)
    problems: list[str] = []
    for path, img in zip(case.images, images):
        name = _relative(spec, path)
        if img.shape[:3] != reference.shape[:3]:
            problems.append(f"{name} shape {img.shape[:3]} != {reference_name} shape {reference.shape[:3]}")
        elif not np.allclose(img.affine, reference.affine, atol=affine_tol):
            problems.append(f"{name} affine differs from {reference_name} by more than {affine_tol} mm")
    return problems


def _value_problems(
    spec: DatasetSpec, case: Case, images: list[nib.Nifti1Image], label: nib.Nifti1Image | None, seen: set[float]
) -> list[str]:
    """Unreadable voxel data, non-finite image voxels and label values not in the dataset's labels; the label's
    values are added to ``seen``."""
    problems: list[str] = []
    for path, img in zip(case.images, images):
        data = _read_data(img, _relative(spec, path), problems)
        num_bad = 0 if data is None else nonfinite_voxels(data)
        if num_bad:
            problems.append(nonfinite_problem(_relative(spec, path), num_bad))
    if label is None:
        return problems
    label_name = _relative(spec, case.label)
    data = _read_data(label, label_name, problems)
    if data is not None:
        values = np.unique(data)
        seen.update(values.tolist())
        bad = [v.item() for v in values if v not in spec.labels.values() or v != np.round(v)]
        if bad:
            problems.append(f"label {label_name} has values {bad} not in dataset.json labels {spec.labels}")
    return problems


def _read_data(img: nib.Nifti1Image, name: str, problems: list[str]) -> np.ndarray | None:
    """The voxel array, or ``None`` after noting why it could not be read (e.g. a truncated file)."""
    try:
        return np.asanyarray(img.dataobj)
    except READ_ERRORS as err:
        problems.append(f"unreadable data in {name}: {type(err).__name__}: {err}")
        return None
