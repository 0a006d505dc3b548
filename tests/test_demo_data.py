"""Synthetic PET/CT demo dataset (veloxseg.data.demo) and the brain-template example script."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from veloxseg.data.datasets import SPLITS_FILE, read_dataset, validate_dataset
from veloxseg.data.demo import GENERATOR_VERSION, add_demo_data_parser, generate_case, main, make_demo_dataset

SMALL = (40, 40, 32)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "ds", num_train=5, num_test=2, seed=7, shape=SMALL)


def best_threshold_dice(values: np.ndarray, truth: np.ndarray) -> float:
    """Best Dice of ``values < t`` or ``values > t`` against boolean ``truth`` over every threshold t; (N,) arrays."""
    order = np.argsort(values, kind="stable")
    sorted_values, sorted_truth = values[order], truth[order]
    cuts = np.flatnonzero(np.diff(sorted_values)) + 1  # number of voxels below each distinct threshold
    positives_below = np.cumsum(sorted_truth)[cuts - 1]
    total = sorted_truth.sum()
    dice_below = 2 * positives_below / (cuts + total)
    dice_above = 2 * (total - positives_below) / (len(values) - cuts + total)
    return float(max(dice_below.max(), dice_above.max()))


def hot_organ_mask(ct: np.ndarray) -> np.ndarray:
    """Organs recognisable on CT: contrast-filled (> 140 HU) kidneys and heart, and the largest water blob (bladder)."""
    smooth = ndimage.gaussian_filter(ct.astype(np.float32), 1.0)
    water, count = ndimage.label(ndimage.binary_opening((smooth > -30) & (smooth < 30), iterations=2))
    bladder = water == 1 + np.argmax(np.bincount(water.ravel())[1:]) if count else np.zeros(ct.shape, bool)
    return ndimage.binary_dilation((smooth > 140) | bladder, iterations=3)


def test_same_seed_gives_identical_arrays_and_other_seed_differs() -> None:
    first, again, other = generate_case(3, 1, SMALL), generate_case(3, 1, SMALL), generate_case(4, 1, SMALL)
    for name in ("ct", "pet", "label", "affine"):
        a, b = getattr(first, name), getattr(again, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    assert not np.array_equal(first.ct, other.ct)
    assert not np.array_equal(first.pet, other.pet)


def test_writes_a_valid_nnunet_folder(demo_dir: Path) -> None:
    spec = read_dataset(demo_dir)
    validate_dataset(spec)
    meta = json.loads((demo_dir / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "PET"}
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["numTraining"] == 5 and meta["file_ending"] == ".nii.gz"
    assert spec.layout == "nnunet" and len(spec.training) == 5 and len(spec.test) == 2
    assert all(case.label is not None and case.label.is_file() for case in spec.test)
    folds = json.loads((demo_dir / SPLITS_FILE).read_text())
    assert sorted(c for fold in folds for c in fold["val"]) == [c.case_id for c in spec.training]
    assert all(set(fold["train"]).isdisjoint(fold["val"]) for fold in folds)
    card = (demo_dir / "README.md").read_text()
    assert "Synthetic data" in card and GENERATOR_VERSION in card and "seed 7" in card


def test_lesions_are_present_varied_and_rare() -> None:
    labels = [generate_case(0, i, SMALL).label for i in range(8)]
    counts = [ndimage.label(label)[1] for label in labels]
    sizes = np.concatenate([np.bincount(ndimage.label(label)[0].ravel())[1:] for label in labels])
    assert min(counts) >= 1 and len(set(counts)) > 1
    assert sizes.min() < 30 and sizes.max() > 10 * sizes.min()
    assert max(label.mean() for label in labels) < 0.02  # strong class imbalance


def test_geometry_is_anisotropic_with_varied_orientations(demo_dir: Path) -> None:
    images = [nib.load(p) for p in sorted((demo_dir / "imagesTr").glob("*_0000.nii.gz"))]
    assert all(np.allclose(img.header.get_zooms(), (2.0, 2.0, 3.0)) for img in images)
    assert len({nib.aff2axcodes(img.affine) for img in images}) > 1
    assert not any(np.allclose(img.affine[:3, :3], np.diag([2.0, 2.0, 3.0])) for img in images)


def test_both_channels_are_needed_to_find_lesions() -> None:
    cases = [generate_case(0, i, (64, 64, 48)) for i in range(4)]
    truth = np.concatenate([c.label.ravel() > 0 for c in cases])
    ct = np.concatenate([c.ct.ravel() for c in cases])
    pet = np.concatenate([c.pet.ravel() for c in cases])
    pet_outside_organs = np.concatenate([np.where(hot_organ_mask(c.ct), 0.0, c.pet).ravel() for c in cases])
    best_single = max(best_threshold_dice(ct, truth), best_threshold_dice(pet, truth))
    combined = best_threshold_dice(pet_outside_organs, truth)
    assert best_single < 0.5
    assert combined > best_single + 0.2


def test_cli_writes_dataset_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main([str(out), "--num-train", "2", "--num-test", "1", "--seed", "5", "--shape", "32", "32", "24"]) == 0
    assert len(read_dataset(out).training) == 2
    assert main([str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_subcommand_registration(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="veloxseg")
    add_demo_data_parser(parser.add_subparsers())
    argv = ["demo-data", str(tmp_path / "sub"), "--num-train", "2", "--num-test", "0", "--shape", "32", "32", "24"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert len(read_dataset(tmp_path / "sub").training) == 2


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        generate_case(0, 0, (16, 64, 64))
    with pytest.raises(ValueError, match="num_train"):
        make_demo_dataset(tmp_path, num_train=1)


def load_example(name: str):
    """A script of examples/ as a module (it imports its neighbours, so examples/ goes on the path)."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        module_spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # as an import would (its dataclasses look their module up there)
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "examples"))
    return module


TEMPLATE_TASKS = {
    "mni152": ({"background": 0, "grey_matter": 1, "white_matter": 2}, "Copyright (C) 1993-2009 Louis Collins"),
    "colin27": (
        {"background": 0, "cerebral_grey_matter": 1, "cerebellar_grey_matter": 2},
        "AAL regions merged: 1-90 into cerebral_grey_matter; 91-116 into cerebellar_grey_matter.",
    ),
    "colin27_deep": (
        {"background": 0, "caudate": 1, "putamen": 2, "thalamus": 3, "hippocampus": 4},
        "AAL regions merged: 71-72 into caudate; 73-74 into putamen; 77-78 into thalamus; 37-38 into hippocampus.",
    ),
}


@pytest.mark.parametrize("template", list(TEMPLATE_TASKS))
def test_brain_template_script_writes_aligned_cases(
    tmp_path: Path, template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_example("prepare_brain_templates")
    if template == "mni152":
        pytest.importorskip("nilearn", reason="nilearn (the veloxseg[demo] extra) ships the MNI templates")
    elif not (script.MRICRON_DIR / "ch2.nii.gz").is_file():
        pytest.skip("Debian's mricron-data (Colin27 and AAL) is not installed")
    else:
        monkeypatch.setitem(sys.modules, "nilearn", None)  # the Colin27 tasks do not need nilearn
    out = script.prepare(tmp_path / "brain", num_train=2, num_test=1, seed=0, resolution=4, template=template)
    spec = read_dataset(out)
    validate_dataset(spec)
    labels, notice = TEMPLATE_TASKS[template]
    assert spec.channel_names == ["T1"] and spec.labels == labels
    for case in spec.training + spec.test:
        image, label = nib.load(case.images[0]), nib.load(case.label)
        assert image.shape == label.shape and np.allclose(image.affine, label.affine)
        assert np.allclose(image.header.get_zooms(), 4)
        assert set(np.unique(np.asanyarray(label.dataobj))) == set(labels.values())
    first, second = (np.asanyarray(nib.load(c.images[0]).dataobj) for c in spec.training)
    assert not np.array_equal(first, second)  # augmented copies differ
    assert notice in (out / "NOTICE.txt").read_text()


def test_tissue_posteriors_put_the_border_where_the_image_has_it() -> None:
    """Blurred priors (a ramp from grey to white over 20 voxels) and a sharp T1 edge at voxel 24: the
    maps' own labels put the border past the ramp's middle (voxel 21), the posteriors at the edge."""
    script = load_example("prepare_brain_templates")
    x = np.arange(40, dtype=np.float32)
    white_prior = np.clip((x - 10) / 20, 0, 1) * 0.95
    priors = np.broadcast_to(np.stack([0.95 - white_prior, white_prior])[:, :, None, None], (2, 40, 6, 6)).copy()
    rng = np.random.default_rng(0)
    t1 = np.where(x < 24, 0.65, 0.85)[:, None, None] + rng.normal(0, 0.02, (40, 6, 6))
    maps_border = int(np.argmax(script.tissue_labels(priors)[:, 0, 0] == 2))
    posterior = script.tissue_posteriors(t1.astype(np.float32), priors)
    posterior_labels = script.tissue_labels(posterior)
    assert maps_border == 21
    assert (posterior_labels[:24] == 1).mean() > 0.95 and (posterior_labels[24:] == 2).mean() > 0.95
    assert posterior.shape == priors.shape and np.all(posterior.sum(0) <= 1 + 1e-5)
    with pytest.raises(ValueError, match="unknown labels"):
        script.load_templates(3, "mni152", labels="sharp")


def test_synthesised_cases_follow_their_labels_and_vary_in_shape() -> None:
    """Two cases synthesised from one toy map set: labels where the maps say, each tissue's intensities
    set apart from the others (T1 order), and tissue borders that differ between the cases."""
    script = load_example("prepare_brain_templates")
    x = np.linspace(-1, 1, 48)
    radius = np.sqrt(x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2)
    white = np.clip((0.55 - radius) / 0.2, 0, 1)  # a ball of white matter in a shell of grey, in CSF
    grey = np.clip((0.8 - radius) / 0.1, 0, 1) * (1 - white)
    maps = np.stack([grey, white, (radius < 0.9).astype(float)]).astype(np.float32)
    cases = [script.synthesise(maps, 2, np.random.default_rng(seed)) for seed in (0, 1)]
    for t1, labels in cases:
        assert t1.shape == labels.shape == (24, 24, 24) and t1.dtype == np.float32
        assert set(np.unique(labels)) == {0, 1, 2}
        means = [t1[labels == k].mean() for k in (0, 1, 2)]
        assert means[0] < means[1] < means[2]  # background and CSF < grey < white matter
    assert (cases[0][1] != cases[1][1]).mean() > 0.01
    with pytest.raises(ValueError, match="mni152"):
        script.prepare(Path("unused"), template="colin27", synthesised=True)


def test_missing_colin27_files_are_named(tmp_path: Path) -> None:
    script = load_example("prepare_brain_templates")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/ch2.nii.gz.*apt-get install mricron-data"):
        script.load_templates(3, "colin27", tmp_path)


def test_ssl_corpus_holds_every_source_with_its_notice(tmp_path: Path) -> None:
    pytest.importorskip("nilearn", reason="nilearn (the veloxseg[demo] extra) ships the MNI templates")
    script = load_example("prepare_ssl_corpus")
    out = script.prepare(tmp_path / "ssl", copies=1, synthetic=1, mricron_dir=tmp_path / "no-mricron")
    spec = read_dataset(out)
    validate_dataset(spec)
    names = sorted(case.case_id for case in spec.training)
    assert names == ["mni152_1mm_000", "mni152_2mm_000", "mni152_3mm_000", "synthetic_ct_000", "synthetic_pet_000"]
    assert spec.channel_names == ["image"] and not spec.test
    for case in spec.training:
        mask = np.asanyarray(nib.load(case.label).dataobj)
        assert 0.01 < mask.mean() < 0.9, case.case_id  # a rough object mask, for sampling
    notice = (out / "NOTICE.txt").read_text()
    assert "Copyright (C) 1993-2009 Louis Collins" in notice and "Synthetic PET/CT-like scans" in notice
    assert "INIA19" not in notice  # absent here: skipped, so not claimed


def test_brain_contrasts_script_writes_three_contrasts_that_each_carry_their_own_information(tmp_path: Path) -> None:
    pytest.importorskip("nilearn", reason="nilearn (the veloxseg[demo] extra) ships the MNI tissue maps")
    script = load_example("prepare_brain_contrasts")
    out = script.prepare(tmp_path / "contrasts", num_train=1, num_test=1, seed=0, resolution=4)
    spec = read_dataset(out)
    validate_dataset(spec)
    assert spec.channel_names == ["T1", "T2", "FLAIR"] and spec.labels == script.LABELS
    case = spec.training[0]
    label = np.asanyarray(nib.load(case.label).dataobj)
    assert set(np.unique(label)) == {0, 1, 2, 3} and (label == 3).sum() > 100  # lesions of some size
    means = {}
    for name, path in zip(spec.channel_names, case.images):
        image = nib.load(path)
        assert image.shape == label.shape and np.allclose(image.affine, nib.load(case.label).affine)
        data = np.asanyarray(image.dataobj)
        means[name] = [data[label == value].mean() for value in (1, 2, 3)]  # grey, white, lesion
    assert means["T1"][1] > max(means["T1"][0], means["T1"][2])  # white matter brightest, lesions darker
    assert means["T2"][0] > means["T2"][1] and means["T2"][2] > means["T2"][0]  # grey above white; lesions bright
    assert means["FLAIR"][2] == max(means["FLAIR"])  # lesions brightest
    assert "Copyright (C) 1993-2009 Louis Collins" in (out / "NOTICE.txt").read_text()
