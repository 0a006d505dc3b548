"""Reading, validating and splitting datasets (veloxseg.data.datasets) and the MONAI transforms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from veloxseg.data.datasets import (
    SPLITS_FILE,
    DatasetError,
    DatasetSpec,
    from_hf_dataset,
    read_dataset,
    split_cases,
    validate_dataset,
)
from veloxseg.data.demo import LABELS, make_demo_dataset
from veloxseg.data.transforms import (
    channel_infos,
    eval_transforms,
    make_dataset,
    normalisation_transforms,
    train_transforms,
)
from veloxseg.metadata import ChannelInfo, ModelMetadata

SHAPE = (32, 32, 24)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("pristine") / "ds", num_train=6, num_test=1, seed=1, shape=SHAPE)


@pytest.fixture()
def demo(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the small demo dataset that a test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "ds"))


def preprocessing(spec: DatasetSpec, spacing: tuple[float, float, float] | None = None) -> ModelMetadata:
    """The trainer's metadata of a dataset: its channels' normalisation, its labels, the spacing."""
    return ModelMetadata(channels=channel_infos(spec.channel_names), labels=spec.labels, spacing=spacing)


def save_like(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Overwrite ``path`` with ``data``, keeping its affine unless one is given."""
    nib.save(nib.Nifti1Image(data, nib.load(path).affine if affine is None else affine), path)


def write_msd(root: Path) -> None:
    """A tiny Medical Segmentation Decathlon folder: 4-D two-channel images, 3-D labels."""
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 2.5, 1.0])
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    training = []
    for name in ("brats_001", "brats_002"):
        label = np.zeros((20, 18, 16), np.uint8)
        label[5:9, 6:10, 4:8] = 1
        label[10:12, 6:8, 8:10] = 2
        nib.save(nib.Nifti1Image(rng.random((20, 18, 16, 2), np.float32), affine), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    nib.save(nib.Nifti1Image(rng.random((20, 18, 16, 2), np.float32), affine), root / "imagesTs" / "brats_003.nii.gz")
    meta = {
        "name": "tiny",
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "oedema", "2": "tumour"},
        "numTraining": 2,
        "numTest": 1,
        "training": training,
        "test": ["./imagesTs/brats_003.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(meta))


def test_reads_nnunet_folder(pristine: Path) -> None:
    spec = read_dataset(pristine)
    assert spec.layout == "nnunet" and spec.channel_names == ["CT", "PET"] and spec.labels == LABELS
    assert [c.case_id for c in spec.training] == [f"case_{i:04d}" for i in range(6)]
    case = spec.training[2].as_dict()
    assert case["image"] == [str(pristine / "imagesTr" / f"case_0002_000{c}.nii.gz") for c in (0, 1)]
    assert case["label"] == str(pristine / "labelsTr" / "case_0002.nii.gz")
    assert [c.case_id for c in spec.test] == ["test_0000"]


def test_reads_msd_folder_with_4d_images(tmp_path: Path) -> None:
    write_msd(tmp_path)
    spec = read_dataset(tmp_path)
    validate_dataset(spec)
    assert spec.layout == "msd" and spec.channel_names == ["FLAIR", "T1w"]
    assert spec.labels == {"background": 0, "oedema": 1, "tumour": 2}
    assert [c.case_id for c in spec.training] == ["brats_001", "brats_002"]
    assert spec.training[0].images == (tmp_path / "imagesTr" / "brats_001.nii.gz",)
    assert [c.case_id for c in spec.test] == ["brats_003"] and spec.test[0].label is None
    loaded = eval_transforms(preprocessing(spec))(spec.training[0].as_dict())
    assert loaded["image"].shape == (2, 20, 18, 16) and loaded["label"].shape == (1, 20, 18, 16)


def test_msd_image_with_wrong_channel_count_is_named(tmp_path: Path) -> None:
    write_msd(tmp_path)
    save_like(tmp_path / "imagesTr" / "brats_002.nii.gz", np.zeros((20, 18, 16, 3), np.float32))
    with pytest.raises(DatasetError, match=r"brats_002: .*expected 2 channel"):
        validate_dataset(read_dataset(tmp_path))


def test_validation_lists_every_bad_case_at_once(demo: Path) -> None:
    images, labels = demo / "imagesTr", demo / "labelsTr"
    (images / "case_0000_0001.nii.gz").unlink()
    save_like(labels / "case_0001.nii.gz", np.zeros((30, 32, 24), np.uint8))
    save_like(labels / "case_0002.nii.gz", np.full(SHAPE, 3, np.uint8))
    truncated = (images / "case_0003_0000.nii.gz").read_bytes()
    (images / "case_0003_0000.nii.gz").write_bytes(truncated[: len(truncated) // 2])
    pet = nib.load(images / "case_0004_0001.nii.gz").get_fdata(dtype=np.float32)
    pet[3, 4, 5] = np.nan
    save_like(images / "case_0004_0001.nii.gz", pet)
    shifted = nib.load(labels / "case_0005.nii.gz").affine.copy()
    shifted[:3, 3] += 5.0
    save_like(labels / "case_0005.nii.gz", np.asanyarray(nib.load(labels / "case_0005.nii.gz").dataobj), shifted)

    with pytest.raises(DatasetError) as caught:
        validate_dataset(read_dataset(demo))
    problems = caught.value.problems
    expected = {
        "case_0000": "missing channel 1 (PET) file imagesTr/case_0000_0001.nii.gz",
        "case_0001": "shape (32, 32, 24) != labelsTr/case_0001.nii.gz shape (30, 32, 24)",
        "case_0002": "values [3] not in dataset.json labels",
        "case_0003": "unreadable data in imagesTr/case_0003_0000.nii.gz",
        "case_0004": "imagesTr/case_0004_0001.nii.gz holds 1 non-finite voxels (NaN/inf",
        "case_0005": "affine differs from labelsTr/case_0005.nii.gz",
    }
    for case_id, words in expected.items():
        assert any(p.startswith(f"{case_id}: ") and words in p for p in problems), (case_id, problems)
    assert not any(p.startswith("test_0000") for p in problems)
    assert "case_0003" in str(caught.value)


def test_missing_label_missing_channel_and_count_mismatch(demo: Path) -> None:
    (demo / "labelsTr" / "case_0003.nii.gz").unlink()
    (demo / "imagesTr" / "case_0004_0000.nii.gz").unlink()
    for path in [*(demo / "imagesTr").glob("case_0005_*"), demo / "labelsTr" / "case_0005.nii.gz"]:
        path.unlink()
    with pytest.raises(DatasetError) as caught:
        validate_dataset(read_dataset(demo))
    assert caught.value.problems == [
        "dataset.json says numTraining=6 but 5 cases were found",
        "case_0003: missing label file labelsTr/case_0003.nii.gz",
        "case_0004: missing channel 0 (CT) file imagesTr/case_0004_0000.nii.gz",
    ]


def test_structural_problems_are_named(demo: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset\.json not found"):
        read_dataset(tmp_path / "nowhere")
    shutil.copy(demo / "imagesTr" / "case_0000_0000.nii.gz", demo / "imagesTr" / "case_0000_0002.nii.gz")
    with pytest.raises(DatasetError, match=r"imagesTr/case_0000_0002.nii.gz: not named"):
        read_dataset(demo)
    (demo / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(DatasetError, match="neither 'channel_names'"):
        read_dataset(demo)


def test_split_uses_splits_file_or_a_seeded_random_split(demo: Path) -> None:
    spec = read_dataset(demo)
    folds = json.loads((demo / SPLITS_FILE).read_text())
    train, val = split_cases(spec, fold=1)
    assert [c.case_id for c in val] == folds[1]["val"] and [c.case_id for c in train] == folds[1]["train"]

    (demo / SPLITS_FILE).unlink()
    train, val = split_cases(spec, val_fraction=0.34, seed=3)
    assert len(val) == 2 and len(train) == 4
    assert {c.case_id for c in train + val} == {c.case_id for c in spec.training}
    assert split_cases(spec, val_fraction=0.34, seed=3) == (train, val)
    assert split_cases(spec, val_fraction=0.34, seed=4) != (train, val)


def test_from_hf_dataset_paths_and_bytes(pristine: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    cases = read_dataset(pristine).training[:2]
    ds = datasets.Dataset.from_dict(
        {
            "id": [c.case_id for c in cases],
            "ct": [str(c.images[0]) for c in cases],
            "pet": [c.images[1].read_bytes() for c in cases],
            "mask": [str(c.label) for c in cases],
        }
    )
    spec = from_hf_dataset(ds, tmp_path / "hf", ["ct", "pet"], "mask", LABELS, ["CT", "PET"], case_id_column="id")
    validate_dataset(spec)
    assert spec.channel_names == ["CT", "PET"] and [c.case_id for c in spec.training] == [c.case_id for c in cases]
    for new, old in zip(spec.training, cases):
        for a, b in zip(new.images + (new.label,), old.images + (old.label,)):
            assert np.array_equal(np.asanyarray(nib.load(a).dataobj), np.asanyarray(nib.load(b).dataobj))
    with pytest.raises(DatasetError, match="no column"):
        from_hf_dataset(ds, tmp_path / "bad", ["ct", "t2"], "mask", LABELS)


def test_train_transforms_pad_crop_and_reorient(pristine: Path) -> None:
    spec = read_dataset(pristine)
    case = spec.training[0].as_dict()
    roi = (48, 40, 40)  # larger than the 32 x 32 x 24 volume: padded
    samples = train_transforms(preprocessing(spec, (2.0, 2.0, 3.0)), roi, num_samples=3)(case)
    assert len(samples) == 3
    for sample in samples:
        assert sample["image"].shape == (2, *roi) and sample["label"].shape == (1, *roi)
        assert sample["image"].dtype == torch.float32 and set(sample["label"].unique().tolist()) <= {0.0, 1.0}


def test_eval_transforms_reorient_resample_and_normalise(pristine: Path) -> None:
    spec = read_dataset(pristine)
    case = next(c for c in spec.training if nib.aff2axcodes(nib.load(c.label).affine) != ("R", "A", "S"))
    label_img = nib.load(case.label)
    canonical = np.asanyarray(nib.as_closest_canonical(label_img).dataobj)

    native = eval_transforms(preprocessing(spec))(case.as_dict())
    assert nib.aff2axcodes(native["label"].affine.numpy()) == ("R", "A", "S")
    assert np.array_equal(native["label"][0].numpy(), canonical)

    resampled = eval_transforms(preprocessing(spec, (3.0, 3.0, 3.0)))(case.as_dict())
    image, label = resampled["image"], resampled["label"]
    assert np.allclose(image.pixdim, (3.0, 3.0, 3.0)) and image.shape[1:] == label.shape[1:]
    expected_shape = [n * s / 3.0 for n, s in zip(canonical.shape, (2.0, 2.0, 3.0))]
    assert all(abs(a - b) <= 1.0 for a, b in zip(image.shape[1:], expected_shape))
    lesion_ml = float(label.sum()) * 27.0 / 1000
    assert lesion_ml == pytest.approx(canonical.sum() * 12.0 / 1000, rel=0.5, abs=0.1)
    ct, pet = image[0], image[1]
    assert ct.min() >= -1.0 and ct.max() <= 1.0 and ct.min() == -1.0  # air at the window's floor
    assert float(pet[pet != 0].mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(pet[pet != 0].std()) == pytest.approx(1.0, abs=1e-2)


def test_normalisation_follows_the_channel_metadata() -> None:
    channels = [
        ChannelInfo("CT", 0, "ct", clip=(-100.0, 300.0), mean=50.0, std=200.0),
        ChannelInfo("PET", 1, "zscore"),
        ChannelInfo("mask", 2, "none"),
        ChannelInfo("CT", 3, "ct", mean=10.0, std=5.0),
    ]
    image = torch.randn(4, 6, 5, 4, generator=torch.Generator().manual_seed(0)) * 500
    image[:, 0] = 0
    loaded = MetaTensor(image.clone())  # as LoadImaged gives it
    out = Compose(normalisation_transforms(channels))({"image": loaded})["image"].as_tensor()
    torch.testing.assert_close(out[0], (image[0].clamp(-100.0, 300.0) - 50.0) / 200.0)
    pet = image[1][image[1] != 0]
    torch.testing.assert_close(out[1][image[1] != 0], (pet - pet.mean()) / pet.std(unbiased=False))
    assert (out[1][image[1] == 0] == 0).all()
    torch.testing.assert_close(out[2], image[2])
    torch.testing.assert_close(out[3], (image[3] - 10.0) / 5.0)


def test_training_normalises_ct_with_a_fixed_window() -> None:
    ct, pet = channel_infos(["ct ", "PET"])
    assert (ct.normalisation, ct.clip, ct.mean, ct.std) == ("ct", (-1000.0, 1000.0), 0.0, 1000.0)
    assert (pet.normalisation, pet.group) == ("zscore", 1)


def test_make_dataset(pristine: Path) -> None:
    spec = read_dataset(pristine)
    metadata = preprocessing(spec, (2.0, 2.0, 3.0))
    train = make_dataset(spec.training, train_transforms(metadata, (32, 32, 32), num_samples=2))
    val = make_dataset(spec.training[:1], eval_transforms(metadata), cache=False)
    assert len(train) == len(spec.training) and len(val) == 1
    assert [s["image"].shape for s in train[0]] == [(2, 32, 32, 32)] * 2
    assert val[0]["image"].shape[0] == 2 and val[0]["label"].shape[0] == 1
