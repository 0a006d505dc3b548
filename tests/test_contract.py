"""The model contract: a target spacing from the training data, normalisation that means the same
whatever a scan's background holds, augmentation that covers both kinds of background, and one
inference path for validation, test scores and ``veloxseg predict``."""

import importlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from monai.transforms import Compose

import veloxseg
from veloxseg.data import make_demo_dataset, read_dataset
from veloxseg.data.datasets import Case
from veloxseg.data.transforms import (
    RandBackgroundd,
    channel_infos,
    foreground_threshold,
    normalisation_transforms,
)
from veloxseg.metadata import ChannelInfo, ModelMetadata
from veloxseg.predict import predict
from veloxseg.training import TrainConfig, train
from veloxseg.training.config import resolve
from veloxseg.training.data import spacing_fingerprint, training_metadata
from veloxseg.training.validate import score_test_cases

from .conftest import SMALL_ROI

T1 = ChannelInfo("T1", 0, "foreground_zscore")


def brain(background: str, rng: np.random.Generator) -> torch.Tensor:
    """(1, 48, 48, 48) a bright textured block in a background of exact zeros or magnitude noise."""
    image = np.zeros((1, 48, 48, 48), np.float32)
    image[:, 12:36, 12:36, 12:36] = 400 + 300 * np.random.default_rng(0).random((1, 24, 24, 24))
    if background == "noise":
        outside = image == 0
        image[outside] = np.abs(rng.normal(0, 15, int(outside.sum())))
    return torch.from_numpy(image)


def normalise(image: torch.Tensor, info: ChannelInfo = T1) -> torch.Tensor:
    return Compose(normalisation_transforms([info]))({"image": image})["image"]


def test_foreground_zscore_ignores_the_background():
    """Zeroed, noised or cropped background: the brain gets the same values (the nonzero z-score moves)."""
    rng = np.random.default_rng(1)
    zeros, noisy = brain("zeros", rng), brain("noise", rng)
    inside = (slice(None), slice(12, 36), slice(12, 36), slice(12, 36))
    torch.testing.assert_close(normalise(zeros)[inside], normalise(noisy)[inside])
    cropped = zeros[:, 6:42, 6:42, 6:42]
    torch.testing.assert_close(normalise(cropped)[:, 6:30, 6:30, 6:30], normalise(zeros)[inside])
    nonzero = ChannelInfo("T1", 0, "zscore")
    assert not torch.allclose(normalise(zeros, nonzero)[inside], normalise(noisy, nonzero)[inside], atol=0.05)


def test_foreground_zscore_leaves_an_empty_scan_alone():
    assert foreground_threshold(torch.zeros(8, 8, 8)) == 0.0
    assert torch.equal(normalise(torch.zeros(1, 8, 8, 8)), torch.zeros(1, 8, 8, 8))


def test_channel_rule():
    infos = channel_infos(["CT", "PET", "T1", "FLAIR"])
    assert [i.normalisation for i in infos] == ["ct", "zscore", "foreground_zscore", "foreground_zscore"]


def test_training_augmentation_covers_zero_and_noisy_backgrounds():
    """Over a few draws the background comes out as exact zeros, as noise and as it was."""
    image = brain("noise", np.random.default_rng(2))
    outside = image <= foreground_threshold(image)
    augment = RandBackgroundd("image")
    seen = set()
    for seed in range(12):
        augment.set_random_state(seed)
        out = augment({"image": image})["image"][outside]
        seen.add("zeros" if not out.any() else "kept" if torch.equal(out, image[outside]) else "noise")
    assert seen == {"zeros", "noise", "kept"}
    augment.set_random_state(0)
    inside = augment({"image": image})["image"][~outside]
    assert torch.equal(inside, image[~outside])  # the foreground is never touched


def case_at(folder: Path, name: str, zooms: tuple[float, float, float]) -> Case:
    affine = np.diag([*zooms, 1.0])
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), affine), path)
    return Case(name, (path,))


def test_spacing_fingerprint_is_the_median_in_ras(tmp_path):
    cases = [case_at(tmp_path, f"c{i}", z) for i, z in enumerate([(1, 1, 2), (1, 2, 2), (3, 1, 2)])]
    assert spacing_fingerprint(cases) == (1.0, 1.0, 2.0)
    swapped = tmp_path / "swapped.nii.gz"  # voxel axes (y, x, z) in the world: the fingerprint is per RAS axis
    axes_swapped = np.array([[0, 5, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), axes_swapped), swapped)
    assert spacing_fingerprint([Case("s", (swapped,))]) == (5.0, 1.0, 1.0)


def test_spacing_fingerprint_of_anisotropic_data_takes_the_10th_percentile(tmp_path):
    zooms = [(1, 1, 5)] * 5 + [(1, 1, 8)] * 5  # z over 3x the in-plane spacing: nnU-Net's rule
    cases = [case_at(tmp_path, f"c{i}", z) for i, z in enumerate(zooms)]
    assert spacing_fingerprint(cases) == (1.0, 1.0, 5.0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "D", num_train=3, num_test=2, shape=(40, 40, 32))


def test_trainer_records_the_fingerprint_unless_told(demo):
    spec = read_dataset(demo)
    fingerprint = training_metadata(resolve(TrainConfig(data=str(demo))), spec, 2, 1).spacing
    assert fingerprint == spacing_fingerprint(spec.training) and len(fingerprint) == 3
    assert training_metadata(resolve(TrainConfig(data=str(demo), native_spacing=True)), spec, 2, 1).spacing is None
    given = resolve(TrainConfig(data=str(demo), spacing=(2.5, 2.5, 2.5)))
    assert training_metadata(given, spec, 2, 1).spacing == (2.5, 2.5, 2.5)
    with pytest.raises(ValueError, match="spacing or native_spacing"):
        resolve(TrainConfig(data=str(demo), spacing=(2.0, 2.0, 2.0), native_spacing=True))


def test_test_scores_are_what_veloxseg_predict_gives(demo, tmp_path):
    """score_test_cases (validation, the tags' cards, benchmarks) = Dice of predict()'s label maps."""
    model = veloxseg.create_model("veloxseg_tiny", n_classes=2, **SMALL_ROI).eval()
    metadata = ModelMetadata(channels=channel_infos(["CT", "PET"]), labels={"background": 0, "lesion": 1},
                             spacing=(2.5, 2.5, 3.5))  # fmt: skip
    model.pretrained_cfg = {**model.pretrained_cfg, "veloxseg": metadata.to_dict()}
    spec = read_dataset(demo)
    scores = score_test_cases(model, spec)
    dices = []
    for case in spec.test:
        prediction = np.asarray(predict(model, list(case.images)).dataobj) == 1
        label = np.asarray(nib.load(case.label).dataobj) == 1
        if label.any() or prediction.any():
            dices.append(2 * (prediction & label).sum() / (prediction.sum() + label.sum()))
    assert scores["test/cases"] == len(spec.test)
    assert scores["test/dice"] == pytest.approx(float(np.mean(dices)), abs=1e-6)


def test_validation_runs_through_the_predictor(demo, tmp_path, monkeypatch):
    """A training run's validation calls predict_probabilities with the run's metadata (its spacing)."""
    validate_module = importlib.import_module("veloxseg.training.validate")  # the package exports a function of that name
    seen = []
    real = validate_module.predict_probabilities

    def spy(model, scan, **kwargs):
        seen.append(kwargs["metadata"].spacing)
        return real(model, scan, **kwargs)

    monkeypatch.setattr(validate_module, "predict_probabilities", spy)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(1)
    config = TrainConfig(data=str(demo), model="veloxseg_tiny", roi=64, num_workers=0, progress=False,
                         max_steps=2, val_every=2, checkpoint_every=2, output_dir=str(tmp_path / "run"))  # fmt: skip
    result = train(config)
    fingerprint = spacing_fingerprint(read_dataset(demo).training)
    assert seen and all(spacing == fingerprint for spacing in seen)
    assert result.metrics["val/cases"] == len(seen)


def test_a_single_slice_is_refused(tmp_path):
    model = veloxseg.create_model("veloxseg_tiny", group_channels=[1], n_classes=2, **SMALL_ROI)
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((64, 64, 1), np.float32), np.eye(4)), path)
    with pytest.raises(ValueError, match="not a 3-D volume"):
        predict(model, path)
